"""Multi-process training under ``torchrun`` (DistributedDataParallel), and the one-process default.

``torchrun --nproc_per_node=K script.py ...`` starts K processes with ``RANK``, ``LOCAL_RANK``
and ``WORLD_SIZE`` in their environment. :func:`init_distributed` reads them, joins the
process group (NCCL on GPUs, gloo on the CPU) and picks the process's device (``cuda:LOCAL_RANK``
on a GPU machine). One process under torchrun joins a process group of one, so a 1-GPU
``torchrun`` run takes the same NCCL path as several. Without those variables it returns a
single-process :class:`DistInfo` and nothing else changes: every helper below is then a no-op.

Only the main process (rank 0) writes logs, TensorBoard, checkpoints and results; every
process computes the same validation metrics (the validation sets are small), so all of them
take the same early-stopping decision without extra messages.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun: a process group is joined, even of one process

    @property
    def enabled(self):
        return self.launched or self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device):
    """Join the process group when started by torchrun; return ``(DistInfo, device)``.

    ``device`` is the resolved device of the config / flags: on CUDA each process takes
    ``cuda:LOCAL_RANK``; on the CPU the processes share it (gloo).
    """
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(), device
    world = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s): start torchrun with "
                            f"--nproc_per_node <= {torch.cuda.device_count()}")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, launched=True), device


def cleanup_distributed(info):
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def collective_device(backend=None):
    """Where the tensors of a collective must live: the process's GPU under NCCL (which takes no
    CPU tensors), the CPU under gloo. ``backend`` defaults to the joined group's."""
    backend = backend or dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def barrier(info):
    if info.enabled:
        dist.barrier()


def wrap_ddp(model, info, device):
    """``DistributedDataParallel(model)`` when distributed, else ``model``."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean_over_processes(values, info, device, sum_keys=()):
    """A dict of numbers averaged over the processes (each process passes its own); the keys in
    ``sum_keys`` (counts, throughputs) are summed instead."""
    if not info.enabled:
        return values
    keys = [k for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    out = {k: float(v) if k in sum_keys else float(v) / info.world_size for k, v in zip(keys, t.tolist())}
    return {**values, **out}


def broadcast_object(obj, info, src=0):
    """``obj`` of process ``src`` on every process (e.g. a decision only rank 0 can take)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def replicas_in_sync(tensors, info):
    """Whether every process holds the same values of ``tensors`` (a module's parameters or any
    tensors; DDP's gradient averaging keeps the parameters so).

    Compares a float64 checksum over the processes; True on one process.
    """
    if not info.enabled:
        return True
    if isinstance(tensors, torch.nn.Module):
        tensors = tensors.parameters()
    params = [p.detach().double().sum() for p in tensors]
    checksum = torch.stack(params).sum().reshape(1).to(collective_device())
    gathered = [torch.zeros_like(checksum) for _ in range(info.world_size)]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def any_over_processes(flag, info):
    """Whether ``flag`` (a 0-dim bool tensor) is true on any process (a host sync)."""
    if not info.enabled:
        return bool(flag)
    t = flag.detach().to(torch.int32).reshape(1).to(collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_from_processes(tensors, info):
    """Concatenate each tensor of ``tensors`` over the processes (rank order); all processes
    must pass tensors of the same shapes."""
    if not info.enabled:
        return tensors
    out = []
    for t in tensors:
        src = t.detach().contiguous()
        work = src.to(collective_device())
        if work.dtype == torch.bool:
            work = work.to(torch.uint8)
        parts = [torch.empty_like(work) for _ in range(info.world_size)]
        dist.all_gather(parts, work)
        cat = torch.cat(parts).to(src.device)
        out.append(cat.bool() if t.dtype == torch.bool else cat)
    return tuple(out)
