"""Seeding: one call at the start of a run, plus per-worker seeds for DataLoaders."""
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
    """Restore what :func:`rng_state` saved (CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
