"""Ctrl-C, SIGTERM and SIGHUP: a command ends with one line saying where it stopped and the command
that goes on.

Batch schedulers stop a job with SIGTERM (Slurm at the time limit or on ``scancel``, then SIGKILL
after a grace period; Kubernetes and ``timeout`` do the same), and closing a terminal sends
SIGHUP. The entry points' wrapper (:func:`utils.errors.exit_on_user_error`) turns both into
:class:`Stop`, a ``KeyboardInterrupt``, while the command runs (:func:`stop_signals`), so they end
a run exactly as Ctrl-C does: every clean-up runs (the lock released, temporary files removed),
then one line without a traceback and the exit code 128 + the signal's number (130 for Ctrl-C,
143 for SIGTERM, 129 for SIGHUP), as a shell reports a process killed by it. A trainer raises
:class:`Interrupted` with its own message (the epoch saved in ``last.pt`` and the resume command)
after writing the same line to the run's log.

A file being written when the signal comes is finished first (:func:`finish_before_stopping`,
used by :func:`utils.io.atomic_write`), so a checkpoint is never left half-written and the last
completed epoch stays the resume point.
"""
import os
import shlex
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for Ctrl-C
# Signals that stop a command as Ctrl-C does (SIGINT already raises KeyboardInterrupt).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stop(KeyboardInterrupt):
    """A stop signal other than Ctrl-C (SIGTERM, SIGHUP), raised as a ``KeyboardInterrupt`` so that
    every clean-up written for Ctrl-C runs for it too."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


class Interrupted(Exception):
    """A run stopped by Ctrl-C or a stop signal; the message says where, and the command that resumes it.
    ``code`` is the exit code (128 + the signal's number)."""

    def __init__(self, message, code=EXIT_INTERRUPTED):
        super().__init__(message)
        self.code = code


def stopped_by(exc):
    """``(what stopped the command, its exit code)`` for a ``KeyboardInterrupt``: ("Ctrl-C", 130),
    ("SIGTERM", 143), ("SIGHUP", 129)."""
    if isinstance(exc, Stop):
        return signal.Signals(exc.signum).name, 128 + exc.signum
    return "Ctrl-C", EXIT_INTERRUPTED


def _raise_stop(signum, frame):
    # The process is stopping: a repeated signal (a scheduler signalling again) must not interrupt
    # the clean-up (SIGKILL after the grace period still ends one that hangs). A scheduler signals
    # every process of the job, DataLoader workers included, which then die by the signal: PyTorch's
    # SIGCHLD handler would report each as a failed worker in the middle of the clean-up.
    # (A Python no-op, not SIG_IGN: a signal already pending would then print a warning.)
    for other in (*STOP_SIGNALS, signal.SIGCHLD):
        signal.signal(other, _ignore)
    raise Stop(signum)


def _ignore(signum, frame):
    pass


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


@contextmanager
def stop_signals():
    """Within the block, SIGTERM and SIGHUP raise :class:`Stop` (a ``KeyboardInterrupt``) in the main
    thread; their previous handlers come back after it. A signal that is ignored (``nohup`` ignores
    SIGHUP) or already handled by someone else keeps its handler. Outside the main thread (no signal
    can be handled there) the block runs unchanged. After a stop, SIGCHLD stays ignored: the
    DataLoader workers the signal killed may still be reaped while the command exits."""
    previous = {}
    if _in_main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) == signal.SIG_DFL:
                previous[signum] = signal.signal(signum, _raise_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def finish_before_stopping():
    """Hold Ctrl-C, SIGTERM and SIGHUP until the block has ended (a file written, or discarded after
    an error), then act on the first one received as it would have acted at once."""
    held, previous = [], {}

    def hold(signum, frame):
        held.append(signum)

    if _in_main_thread():
        for signum in (signal.SIGINT, *STOP_SIGNALS):
            handler = signal.getsignal(signum)
            if handler not in (signal.SIG_IGN, None):  # None: a handler not installed from Python, left alone
                previous[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signum = held[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            else:  # SIG_DFL: end the process as the signal would have
                os.kill(os.getpid(), signum)


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


def rerun_line(exc, script, argv=None):
    """"stopped by <Ctrl-C | SIGTERM | SIGHUP>; to run it again: <command>" for a command without epochs."""
    return f"stopped by {stopped_by(exc)[0]}; to run it again: {rerun_command(script, argv)}"


def saved_epoch(path):
    """The ``epoch`` stored in checkpoint ``path`` (memory-mapped: the tensors are not read), or None."""
    if not Path(path).is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["epoch"])
    except Exception:  # unreadable or not a run state: say nothing about it
        return None


def interruption(last_path, epochs, command, exc=None):
    """:class:`Interrupted` for a training run whose resume checkpoint is ``last_path``, stopped by
    the ``KeyboardInterrupt`` ``exc`` (Ctrl-C or a :class:`Stop`)."""
    what, code = stopped_by(exc)
    epoch = saved_epoch(last_path)
    if epoch is None:
        where = f"before the first of {epochs} epochs finished (no {Path(last_path).name} yet)"
        then = "start it again at epoch 1"
    else:
        where = f"after epoch {epoch} of {epochs} (saved in {last_path})"
        then = "resume" if epoch < epochs else "finish it"
    return Interrupted(f"stopped by {what} {where}; to {then}: {command}", code)
