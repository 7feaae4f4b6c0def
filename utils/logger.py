"""Run logging: terminal + log file in the run directory, tqdm bars, TensorBoard.

Everything the terminal shows (apart from progress bars) is also appended to the run's log
file (``output.txt`` for ANA), so the file is the complete record of a run.
"""
import logging
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm


class _TqdmConsoleHandler(logging.StreamHandler):
    """Console handler that writes through ``tqdm.write`` so open progress bars stay intact."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # never let logging kill a run
            self.handleError(record)


class _LogFileHandler(logging.FileHandler):
    """The run's log file; a line that cannot be written (a full disk) is skipped without the
    "--- Logging error ---" traceback on the terminal, which still shows the line."""

    def handleError(self, record):
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


def setup_run_logger(name, log_file, console=True):
    """Return a logger writing to ``log_file`` (appended; ``None``: no file) and to stderr.

    The logger is specific to ``name`` (use the run directory) and does not propagate to the
    root logger; calling this again for the same name replaces its handlers, so repeated
    in-process runs (tests) never double their output.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    close_run_logger(logger)
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    if log_file is not None:
        file_handler = _LogFileHandler(log_file, mode="a", encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    if console:
        console_handler = _TqdmConsoleHandler(sys.stderr)
        console_handler.setFormatter(logging.Formatter("%(message)s"))
        # records logged with extra={"file_only": True} (an error the entry point prints
        # itself) go to the log file only, so the terminal shows them once
        console_handler.addFilter(lambda record: not getattr(record, "file_only", False))
        logger.addHandler(console_handler)
    return logger


def close_run_logger(logger):
    """Close and detach every handler of ``logger`` (releases the log file)."""
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def progress(iterable, desc, total=None, leave=False):
    """A tqdm bar on stderr that switches itself off when stderr is not a terminal."""
    return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def git_revision():
    """Short SHA of the code's git checkout (logged at the start of a run), or ``unknown``."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def make_summary_writer(log_dir, purge_step=None):
    """A TensorBoard ``SummaryWriter`` writing its event files into ``log_dir``.

    ``purge_step`` hides events of steps >= it left by an interrupted attempt (a resume).
    """
    from torch.utils.tensorboard import SummaryWriter  # heavy import: only when a run starts

    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class LazySummaryWriter:
    """The run's TensorBoard writer, created on first use: a resumed run with nothing left to
    train gets no new event file, and only the main process (``enabled``) writes. ``purge_step``
    (the first epoch this attempt trains) hides the events a killed attempt left for it and later."""

    def __init__(self, log_dir, purge_step=None, enabled=True):
        self._log_dir, self._purge_step, self._enabled, self._writer = log_dir, purge_step, enabled, None

    def __getattr__(self, name):  # add_scalar, add_image, add_histogram, ...: create the writer first
        if self._writer is None:
            self._writer = (make_summary_writer(self._log_dir, self._purge_step) if self._enabled
                            else NullSummaryWriter())
        return getattr(self._writer, name)

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


class RecordBuffer(logging.Handler):
    """Keeps log records until the run's log file is open (nothing is written before the checks
    pass); :meth:`replay` then hands them to the run's logger in order."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def replay(self, logger):
        for record in self.records:
            logger.handle(record)
        self.records.clear()


def buffered_logger(name):
    """``(logger, buffer)``: a logger for the lines a run has before its log opens (the checks of
    its inputs); ``buffer.replay(run_logger)`` writes them once the log is open. The logger is not
    registered with :mod:`logging`, so nothing global is created per run."""
    logger = logging.Logger(name)
    logger.setLevel(logging.INFO)
    buffer = RecordBuffer()
    logger.addHandler(buffer)
    return logger, buffer


class NullSummaryWriter:
    """Stands in for a SummaryWriter where nothing is written (the non-main processes of a
    distributed run): every method accepts anything and does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
