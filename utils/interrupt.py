"""Ctrl-C: a command ends with one line saying where it stopped and the command that goes on.

The entry points' wrapper (:func:`utils.errors.exit_on_user_error`) turns a ``KeyboardInterrupt``
into that line and exit code 130 (the shell's code for SIGINT), without a traceback. A trainer
raises :class:`Interrupted` with its own message (the epoch saved in ``last.pt`` and the
resume command) after writing the same line to the run's log.
"""
import os
import shlex
import shutil
import sys
from pathlib import Path

import torch

EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """A run stopped by Ctrl-C; the message says where, and the command that resumes it."""


def _shown_path(path):
    """``path`` relative to the working directory when it lies below it, else absolute."""
    path = os.path.abspath(path)
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _python():
    on_path = shutil.which("python")
    if on_path and os.path.realpath(on_path) == os.path.realpath(sys.executable):
        return "python"
    return _shown_path(sys.executable)


def rerun_command(script, argv=None, add=()):
    """The shell command that runs ``script`` again with ``argv`` (default: this process's
    arguments), with each flag of ``add`` appended unless already given.

    Under torchrun (``WORLD_SIZE`` > 1) the command starts with torchrun and the number of
    processes per node.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    args += [flag for flag in add if flag not in args]
    words = [_shown_path(script), *args]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        nproc = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        return shlex.join(["torchrun", f"--nproc_per_node={nproc}", *words])
    return shlex.join([_python(), *words])


def saved_epoch(path):
    """The ``epoch`` stored in checkpoint ``path`` (memory-mapped: the tensors are not read), or None."""
    if not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"])
    except Exception:  # unreadable or not a run state: say nothing about it
        return None


def interruption(last_path, epochs, command):
    """:class:`Interrupted` for a training run whose resume checkpoint is ``last_path``."""
    epoch = saved_epoch(last_path)
    if epoch is None:
        where = f"before the first of {epochs} epochs finished (no {Path(last_path).name} yet)"
        then = "start it again at epoch 1"
    else:
        where = f"after epoch {epoch} of {epochs} (saved in {last_path})"
        then = "resume" if epoch < epochs else "finish it"
    return Interrupted(f"stopped by Ctrl-C {where}; to {then}: {command}")
