"""One run per directory: a lock file holding the pid and host of the process that owns the directory.

Both trainers, the preprocessing and the picking take ``<directory>/run.lock`` for their whole
run (under torchrun only the main process does). The file records who holds it (pid, host,
start time, command) and carries an exclusive POSIX record lock (``fcntl.lockf``) that the
kernel drops the moment its process ends, however it ends (kill -9 included), so:

* a second process finds the record lock taken and refuses with one line naming the holder;
* a lock file whose process has ended (its record lock is gone) and that was written on this
  host is stale: it is taken over, and the caller logs the line :meth:`RunLock.acquire` returns;
* a lock file written on another host is refused even when its record lock is free (a network
  file system may not share locks between hosts, and a pid on another host cannot be checked):
  the message says to delete the file if that run has ended.

POSIX record locks belong to the process and are not inherited by forked children, so
DataLoader workers never keep a directory locked after their parent has died.
"""
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from utils.checkpoint import remove_leftover_temp_files
from utils.errors import UserError

LOCK_NAME = "run.lock"


def _read_record(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _describe(record):
    if not record:
        return "an unknown process"
    return (f"pid {record.get('pid')} on host {record.get('host')} since {record.get('started')}"
            + (f" ({record['command']})" if record.get("command") else ""))


class RunLock:
    """``with RunLock(directory, hint):`` holds ``directory/run.lock`` for the block.

    ``hint`` finishes the refusal message (e.g. "or choose another --pathModelParams").
    The directory must exist before :meth:`acquire`; :meth:`check` needs nothing.
    """

    def __init__(self, directory, hint=""):
        self.path = Path(directory) / LOCK_NAME
        self.hint = hint
        self._fd = None
        self.took_over = None  # the log line of a stale lock taken over by acquire()

    def _refuse(self, record, why=""):
        raise UserError(f"{self.path.parent} is in use by another run: {_describe(record)}{why}; "
                        f"wait for it to end{(' ' + self.hint) if self.hint else ''} (lock file {self.path})")

    def _check_record(self, record):
        """Refuse a record written on another host (its process cannot be checked from here)."""
        if record and record.get("host") != socket.gethostname():
            self._refuse(record, why=", which cannot be checked from this host; delete the lock file if "
                                   "that run has ended, or")

    def check(self):
        """Refuse now if another live process holds the lock; reads only (for a fail-fast check
        before the slow part of a start-up; :meth:`acquire` decides)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    self._refuse(_read_record(fd))
                raise
            self._check_record(_read_record(fd))
        finally:
            os.close(fd)  # drops the shared lock

    def acquire(self):
        """Take the lock; return a line for the run's log when a stale lock was taken over, else None."""
        for _ in range(10):  # retried only when the file was replaced while we locked it
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                record = _read_record(fd)
                os.close(fd)
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    self._refuse(record)
                raise
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # the previous holder removed it between our open and lock
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            record = _read_record(fd)
            try:
                self._check_record(record)
            except UserError:
                os.close(fd)
                raise
            mine = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(mine) + "\n").encode("utf-8"))
            self._fd = fd
            if record is not None:
                self.took_over = (f"took over the stale lock {self.path} of {_describe(record)}: that process has "
                                  f"ended (killed or crashed)")
            return self.took_over
        raise UserError(f"{self.path}: cannot take the lock (the file keeps being replaced by another process)")

    def tidy(self, log, folders=()):
        """Once the run's log exists: log the stale lock taken over, and delete (and log) the
        temporary files that writes of a killed run left in the locked folder and ``folders``
        (:func:`utils.checkpoint.remove_leftover_temp_files`; safe because we hold the lock)."""
        if self.took_over:
            log.info(self.took_over)
        removed = [str(Path(folder) / name) for folder in (self.path.parent, *folders)
                   for name in remove_leftover_temp_files(folder)]
        if removed:
            log.info(f"removed {len(removed)} temporary file(s) left by an interrupted write (a killed run): "
                     f"{', '.join(removed)}")

    def release(self):
        """Delete the lock file and drop the lock (deleting first: nobody can lock the old file after)."""
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
