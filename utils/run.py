"""The frame every command that writes an output folder shares: the two trainers
(main.py / main_single.py, train_pu_selective_fixmatch.py), preprocess_cryoem.py, pick_particles.py and
rethreshold_picks.py.

A run is a directory that one process family owns from start to end:

* :func:`claim_run_dir` before the slow start-up: the folder (and its sub-folders ``folders``) can
  be written and no other run holds its lock (``run.lock``, utils/run_lock.py);
* :func:`run_frame` once every input is checked: the main process creates the folder, takes the
  lock, opens the log file, writes the header line, tidies what a killed run left (temporary
  files, a :class:`Staging` folder) and stages the new files; the other processes of a torchrun
  log nothing. On leaving, a :class:`~utils.errors.UserError` is written to the log as its
  one-line message, Ctrl-C (or SIGTERM, SIGHUP) becomes the log's "interrupted:" line (for a
  trainer the :func:`utils.interrupt.interruption` that names the command which resumes the run),
  and the log, the staging folder and the lock are closed in every case;
* :func:`open_run`: :func:`run_frame` as the two training loops call it;
* :func:`check_global_batch`: under torchrun the batch flag is the global batch, split evenly;
* :func:`fast_path_line`, :func:`main_only`, :func:`restore_scaler`, :func:`finished_line`:
  the lines and steps each loop needs in the same words.
"""
import os
import shutil
import sys
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from utils.checks import check_output_dir
from utils.distributed import barrier
from utils.errors import UserError
from utils.interrupt import interruption, rerun_command, rerun_line
from utils.logger import close_run_logger, git_revision, setup_run_logger
from utils.run_lock import RunLock


def claim_run_dir(run_dir, flag, hint="", *, folders=()):
    """Refuse ``run_dir`` or one of its sub-``folders`` (one line naming ``flag``) when it cannot be
    written, or ``run_dir`` when another live run holds it; return its
    :class:`~utils.run_lock.RunLock` (not yet taken)."""
    for folder in (run_dir, *folders):
        check_output_dir(folder, flag)
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


class Staging:
    """A temporary folder inside ``out_dir`` for one run's files, installed all at once.

    ``path(name)`` gives the staged location of an output (parents created); :meth:`install` moves
    every staged file to its place in ``out_dir`` (replacing what is there) after deleting the
    files of the previous run (:meth:`previous_files`) that this run did not write; the temporary
    folder is removed on exit in every case, so an error leaves ``out_dir`` as it was, and a
    :class:`UserError` that names a staged file (a full disk) names its real place instead.

    Enter it only while holding ``out_dir``'s run lock (utils/run_lock.py, :func:`run_frame` does):
    it first deletes the temporary folders a killed run left (their names in ``removed``, logged
    by :meth:`log_removed`).
    """
    prefix = ".stage-"  # the temporary folder's name starts with this
    last = None  # a file installed after every other one (it describes the files installed)

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.tmp = None
        self.removed = []

    def remove_stale(self):
        """Delete the temporary folders of a killed run (safe: we hold the lock)."""
        for stale in sorted(self.out_dir.glob(self.prefix + "*")):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
                self.removed.append(stale.name)

    def log_removed(self, logger):
        """Log the temporary folders of an interrupted run that :meth:`remove_stale` deleted, if any."""
        if self.removed:
            logger.info(f"removed the temporary folder(s) of an interrupted run: {', '.join(self.removed)}")

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.remove_stale()
        self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self.out_dir))
        return self

    def __exit__(self, exc_type, exc, tb):
        shutil.rmtree(self.tmp, ignore_errors=True)
        if isinstance(exc, UserError) and str(self.tmp) in str(exc):  # a full disk: name the file's real place
            raise UserError(str(exc).replace(str(self.tmp), str(self.out_dir))) from None
        return False

    def path(self, name):
        target = self.tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def files(self):
        return sorted(p.relative_to(self.tmp).as_posix() for p in self.tmp.rglob("*") if p.is_file())

    def previous_files(self):
        """The files (relative to ``out_dir``) the previous run wrote, which this run replaces."""
        return []

    def install(self):
        """Move the staged files into ``out_dir``; return their names."""
        new = self.files()
        for name in sorted(set(self.previous_files()) - set(new)):
            stale = self.out_dir / name
            if stale.is_file() and self.out_dir.resolve() in stale.resolve().parents:
                stale.unlink()
        for name in sorted(new, key=lambda n: n == self.last):
            target = self.out_dir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp / name, target)
        return new


@contextmanager
def run_frame(run_dir, lock, log_name, *, name=None, info=None, header=None, logger=None, folders=(),
              staging=None, rerun=None, resume=None):
    """Hold the run directory ``run_dir`` for the block; yields the run's logger.

    On entry (the main process): create ``run_dir``, take ``lock`` (from :func:`claim_run_dir`),
    open the log (``run_dir/log_name``, appended, and the terminal; ``log_name`` None: ``logger``,
    or the terminal only), log ``header``, then what a killed run left: its stale lock, its
    temporary files in ``run_dir`` and in the existing ``folders``, and ``staging``'s old folders;
    enter ``staging`` (a :class:`Staging`, not yet entered; the caller installs it). On leaving:
    with a log file, a :class:`UserError` is logged as its one line and Ctrl-C, SIGTERM or SIGHUP as
    "interrupted: " and ``rerun`` (``(script, argv)``: :func:`utils.interrupt.rerun_line`) or
    ``resume(exc)`` (an :class:`~utils.interrupt.Interrupted` raised instead); then the log, the
    staging folder and the lock are closed, and a ``run_dir`` this run created and left empty is
    removed, whatever happened.

    ``info`` (utils/distributed.py, None: one process): every process must enter (the barrier: none
    starts writing before all have checked their inputs); only the main process writes.
    ``name``: the logger's name (default: the run directory).
    """
    run_dir = Path(run_dir)
    main_process = info is None or info.is_main
    if info is not None:
        barrier(info)
    name = name or str(run_dir.resolve())
    with ExitStack() as stack:
        if main_process:
            created = not run_dir.exists()
            run_dir.mkdir(parents=True, exist_ok=True)

            @stack.callback
            def _remove_if_empty():  # a failed first run leaves no empty folder behind
                if created and run_dir.is_dir() and not any(run_dir.iterdir()):
                    run_dir.rmdir()

            lock.acquire()  # held until the run ends (only by the main process)
            stack.callback(lock.release)
            if staging is not None:
                stack.enter_context(staging)
        if logger is None or log_name is not None:
            logger = setup_run_logger(name if main_process else f"{name}#rank{info.rank}",
                                      run_dir / log_name if main_process and log_name else None,
                                      console=main_process)
            stack.callback(close_run_logger, logger)
        logged = main_process and log_name is not None  # errors go to a log file, the terminal shows them once
        try:
            if header is not None:
                logger.info(header)
            if main_process:
                lock.tidy(logger, [f for f in folders if Path(f).is_dir()])
                if staging is not None:
                    staging.log_removed(logger)
            yield logger
        except UserError as exc:
            if logged:
                logger.error("error: " + " ".join(str(exc).split()), extra={"file_only": True})
            raise
        except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP (utils/interrupt.py)
            if resume is not None:
                stop = resume(exc)
                if logged:
                    logger.error(f"interrupted: {stop}", extra={"file_only": True})
                raise stop from None
            if logged and rerun is not None:
                logger.error("interrupted: " + rerun_line(exc, *rerun), extra={"file_only": True})
            raise


def open_run(run_dir, lock, info, log_name, device, resume_flag, epochs, command=None):
    """:func:`run_frame` for a training loop; yields the run's logger.

    ``log_name``: the log file in ``run_dir`` (output.txt, train.log), opened with the
    :func:`header_line`; ``resume_flag`` and ``epochs``: for the Ctrl-C message (``command``,
    default: this process's command line plus ``resume_flag``). Every process must enter.
    """
    def resume(exc):
        return interruption(run_dir / "last.pt", epochs, command or rerun_command(sys.argv[0], add=(resume_flag,)),
                            exc)

    return run_frame(run_dir, lock, log_name, info=info, header=header_line(device, info), resume=resume)
