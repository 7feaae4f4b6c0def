"""Atomic checkpoint files and safe loading (which family's file, ``weights_only``)."""
from pathlib import Path

import torch

from utils.checks import not_a_file
from utils.errors import UserError
from utils.io import atomic_write


def save_checkpoint(obj, path):
    """``torch.save`` ``obj`` (a dict of tensors and plain types) atomically to ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


# What a checkpoint file holds, told from its keys (see checkpoint_kind).
CHECKPOINT_KINDS = {
    "ana-run": "an ANA run state (last.pt of main.py / main_single.py)",
    "ana-model": "an ANA model state_dict (a best-model file {epoch}_{metric}.pt of main.py / main_single.py)",
    "imagenet": "a ResNet state_dict with 1000 ImageNet classes (torchvision weights)",
    "cryoem-best": "a CryoEM best model (best_model.pt of train_pu_selective_fixmatch.py)",
    "cryoem-run": "a CryoEM run state (last.pt of train_pu_selective_fixmatch.py)",
    "cryoem-data": "CryoEM training data (written by preprocess_cryoem.py)",
}


def _looks_like_torch_file(path):
    """Whether ``path`` starts like what torch.save writes: a zip archive, or a pickle (legacy format)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK") or head[:1] == b"\x80"


def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def checkpoint_kind(obj):
    """Which of :data:`CHECKPOINT_KINDS` ``obj`` (a loaded checkpoint) is, or None."""
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    if {"student", "teacher", "scheduler"} <= keys:
        return "cryoem-run"
    if {"backbone", "patch_size"} <= keys and keys & {"model", "student"}:
        return "cryoem-best"
    if {"model", "optimizer", "weights", "targets"} <= keys:
        return "ana-run"
    if "patches" in keys:
        return "cryoem-data"
    state = obj.get("state_dict", obj) if isinstance(obj.get("state_dict"), dict) else obj
    if _is_state_dict(state) and {"conv1.weight", "fc.weight"} <= set(state):
        return "imagenet" if state["fc.weight"].shape[0] == 1000 else "ana-model"
    return None


def describe_checkpoint(obj):
    """A few words saying what ``obj`` (a loaded checkpoint) is, for error messages."""
    kind = checkpoint_kind(obj)
    if kind is not None:
        return CHECKPOINT_KINDS[kind]
    if _is_state_dict(obj):
        return f"a state_dict of another model (parameters {', '.join(list(obj)[:3])}, ...)"
    if isinstance(obj, dict):
        keys = ", ".join(str(k) for k in list(obj)[:6]) + (", ..." if len(obj) > 6 else "")
        return f"a checkpoint of unknown kind (keys: {keys or 'none'})"
    return f"a {type(obj).__name__}, not a checkpoint dict"


def load_checkpoint(path, map_location="cpu", expected=None, flag=None, mmap=False):
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    ``expected``: the :data:`CHECKPOINT_KINDS` keys the caller accepts; a file of another kind
    (the other model family's checkpoint, training data, ...) is a :class:`UserError` saying
    what the file is and what was expected. ``flag`` (e.g. ``"--checkpoint"``) starts the
    message. ``mmap=True`` leaves the tensors on disk (a cheap look at what a file is).
    """
    path = Path(path)
    name = f"{flag} {path}" if flag else f"checkpoint {path}"
    if path.is_dir():
        raise UserError(f"{name} is a folder; expected a checkpoint file")
    if not path.is_file():
        raise UserError(f"{name} {not_a_file(path)}")
    try:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            if not (mmap and "mmap" in str(exc)):
                raise
            obj = torch.load(path, map_location=map_location, weights_only=True)  # the legacy format
    except Exception as exc:  # corrupt or foreign file: say which one
        text = str(exc)
        if "Unsupported global" in text:  # a pickle of other Python objects
            why = "it holds Python objects that a safe (weights-only) load refuses, so it was not written here"
        elif not _looks_like_torch_file(path):
            why = "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
        else:  # a torch file cut short or damaged
            detail = (text.split("WeightsUnpickler error:")[-1].strip().splitlines() or [""])[0][:160]
            why = f"not a readable PyTorch checkpoint ({type(exc).__name__}: {detail})"
        raise UserError(f"{name} cannot be read: {why}"
                        + (f"; expected {' or '.join(CHECKPOINT_KINDS[k] for k in expected)}" if expected else "")) \
            from None
    if expected is not None and checkpoint_kind(obj) not in expected:
        raise UserError(f"{name} is {describe_checkpoint(obj)}; expected "
                        f"{' or '.join(CHECKPOINT_KINDS[k] for k in expected)}")
    return obj


def remove_leftover_temp_files(directory):
    """Delete the temporary files that :func:`atomic_write` leaves when its process is killed
    mid-write (``.<name>.<random>.tmp``) in ``directory``; return their names.

    Call it only while holding the directory's run lock (utils.run_lock): a running writer's
    temporary file looks the same.
    """
    removed = []
    for tmp in sorted(Path(directory).glob(".*.tmp")):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink()
            removed.append(tmp.name)
    return removed
