"""Atomic checkpoint files and safe loading."""
import os
import tempfile
from pathlib import Path

import torch

from utils.errors import UserError


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write_fn, mode="wb"):
    """Write a file through ``write_fn(fileobj)`` so readers never see a half-written file.

    The data goes to a temporary file in the same directory, is flushed to disk, then
    replaces ``path`` in one ``os.replace``: an interrupted write leaves the old file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(obj, path):
    """``torch.save`` ``obj`` (a dict of tensors and plain types) atomically to ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which one
        raise UserError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
