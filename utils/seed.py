"""Seeding: one call at the start of a run, the seeded DataLoader of both trainers and its workers' seeds."""
import os
import random

import numpy as np
import torch


def seed_everything(seed, deterministic=False):
    """Seed Python, NumPy and torch (CPU and CUDA); optionally ask for deterministic kernels.

    Determinism is opt-in because it costs speed on the GPU (cuDNN benchmark off).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def seed_worker(worker_id):
    """``worker_init_fn`` for DataLoader: derive NumPy/random seeds from torch's worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def rng_state():
    """The torch RNG states (CPU and every CUDA device) as plain tensors for a checkpoint."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`rng_state` saved (CUDA states only where CUDA is present).

    The states are byte tensors on the CPU whatever device the checkpoint was loaded to (a
    resume on a GPU maps every tensor of ``last.pt`` there)."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seeded_loader(dataset, device, num_workers, seed, batch_size=None, sampler=None, batch_sampler=None):
    """The DataLoader of both trainers: a loader with its own generator seeded by ``seed``.

    The loader draws its workers' base seed from that generator, never from the global RNG, so
    the global RNG (dropout masks, augmentation) does not depend on how often loaders are
    iterated, and a resumed run draws what an uninterrupted one draws. Order is given by
    ``sampler`` / ``batch_sampler`` or is sequential; workers seed NumPy and ``random`` from
    their torch seed (:func:`seed_worker`).
    """
    kwargs = dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                  worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(int(seed)))
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, **kwargs)
