"""The frame both training runs share (utils/ana/train.py, utils/cryoem/train.py).

A run is a directory that one process family owns from start to end:

* :func:`claim_run_dir` before the slow start-up: the folder can be written and no other run
  holds its lock (``run.lock``, utils/run_lock.py);
* :func:`check_global_batch`: under torchrun the batch flag is the global batch, split evenly;
* :func:`open_run` once every input is checked: the main process creates the folder, takes the
  lock, opens the log file and writes the header line; the other processes log nothing. On
  leaving, a :class:`~utils.errors.UserError` is written to the log as its one-line message,
  Ctrl-C (or SIGTERM, SIGHUP) becomes the one-line :func:`utils.interrupt.interruption` that names the command which
  resumes the run, and the log and the lock are closed in every case;
* :func:`fast_path_line`, :func:`main_only`, :func:`restore_scaler`, :func:`finished_line`:
  the lines and steps each loop needs in the same words.
"""
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

from utils.checks import check_output_dir
from utils.distributed import barrier
from utils.errors import UserError
from utils.interrupt import interruption, rerun_command
from utils.logger import close_run_logger, git_revision, setup_run_logger
from utils.run_lock import RunLock


def claim_run_dir(run_dir, flag, hint=""):
    """Refuse ``run_dir`` (one line naming ``flag``) when it cannot be written or another live run
    holds it; return its :class:`~utils.run_lock.RunLock` (not yet taken)."""
    check_output_dir(run_dir, flag)
    lock = RunLock(run_dir, hint=hint)
    lock.check()
    return lock


def resume_point(run_dir, resume, flag, started, attempted=(), other_flag="--pathModelParams"):
    """Where a run starts: ``run_dir/last.pt`` to resume from, or None to start at epoch 1.

    ``resume``: the user's resume flag (``flag``, e.g. ``--loadModel`` / ``--resume``); ``started``:
    files of ``run_dir`` that only a run that trained holds (last.pt, results.json); ``attempted``:
    files an attempt writes before its first epoch ends (its log, its settings). ``flag`` without
    any of them is an error (nothing to resume), as is a new run in a folder that holds a started
    run (``other_flag`` names where else to put it). ``flag`` with an attempt that died in its first
    epoch (no last.pt) starts afresh: None.
    """
    last_path = run_dir / "last.pt"
    found = [name for name in started if (run_dir / name).is_file()]
    tried = found or [name for name in attempted if (run_dir / name).is_file()]
    if resume and not tried:
        raise UserError(f"{flag}: {last_path} does not exist (nothing to resume; drop {flag} to start a new run)")
    if not resume and found:
        raise UserError(f"run directory {run_dir} already holds a run ({found[0]}); pass {flag} to continue it "
                        f"or choose another {other_flag}")
    return last_path if resume and last_path.is_file() else None


def check_global_batch(batch_size, info, flag):
    """``batch_size`` (the global batch) must split evenly over the torchrun processes."""
    if batch_size % info.world_size:
        raise UserError(f"{flag} {batch_size} is not divisible by the {info.world_size} processes of torchrun; "
                        f"use a multiple of {info.world_size}")


def header_line(device, info):
    """The first line of a run's log: code revision, device, torch, processes."""
    return (f"git {git_revision()} | device {device} | torch {torch.__version__}"
            + (f" | {info.world_size} processes (DistributedDataParallel) over {dist.get_backend()}"
               if info.enabled else ""))


def fast_path_line(precision, fmt, compiled, backends=None):
    """The log line that says which GPU fast path a run took (utils/precision.py)."""
    return (f"fast path: precision {precision.describe()}, "
            f"{'channels-last' if fmt == torch.channels_last else 'contiguous'}, "
            + (f"{backends}, " if backends else "") + f"torch.compile {'on' if compiled else 'off'}")


def main_only(save, info):
    """``save`` on the main process, a no-op elsewhere (only the main process writes files)."""
    return save if info.is_main else (lambda *args, **kwargs: None)


def restore_scaler(precision, state):
    """Restore a float16 loss scale saved in ``state["scaler"]`` (nothing to do otherwise)."""
    if state.get("scaler") and precision.scaler.is_enabled():
        precision.scaler.load_state_dict(state["scaler"])


def finished_line(last_path, epoch, stopped, limit):
    """The log line of a resumed run that has nothing left to train (``limit``: e.g. "--epoch 30")."""
    why = "stopped early" if stopped else f"reached {limit}"
    return f"{last_path}: this run already {why} after epoch {epoch}; nothing to train"


@contextmanager
def open_run(run_dir, lock, info, log_name, device, resume_flag, epochs, command=None):
    """Open the run directory for the loop; yields the run's logger.

    ``log_name``: the log file in ``run_dir`` (output.txt, train.log); ``resume_flag`` and
    ``epochs``: for the Ctrl-C message (``command``, default: this process's command line plus
    ``resume_flag``). Every process must enter (the barrier: none starts writing before all have
    checked their inputs).
    """
    barrier(info)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # held until the run ends (only by the main process)
        logger = setup_run_logger(str(run_dir.resolve()), run_dir / log_name)
    else:  # the other processes write nothing
        logger = setup_run_logger(f"{run_dir.resolve()}#rank{info.rank}", None, console=False)
    try:
        logger.info(header_line(device, info))
        if info.is_main:
            lock.tidy(logger)
        yield logger
    except UserError as exc:
        logger.error("error: " + " ".join(str(exc).split()), extra={"file_only": True})
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP (utils/interrupt.py)
        stop = interruption(run_dir / "last.pt", epochs, command or rerun_command(sys.argv[0], add=(resume_flag,)),
                            exc)
        logger.error(f"interrupted: {stop}", extra={"file_only": True})
        raise stop from None
    finally:
        close_run_logger(logger)
        lock.release()
