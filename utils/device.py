"""Resolve the compute device once, at the start of a run."""
import torch

from utils.errors import UserError


def resolve_device(name="auto"):
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows (expected auto, cpu or cuda[:N])") from None
