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
DataLoader workers never keep a directory locked after their parent has died. On a file system
without record locks the record alone decides: a live pid of this host holds the directory.
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
_BUSY = (errno.EACCES, errno.EAGAIN)  # another process holds the record lock
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # a file system without record locks


def _read_record(fd):
    """The holder's record ({"pid", "host", "started", "command"}), or None when empty or unreadable."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode("utf-8")) or None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _describe(record):
    if not isinstance(record, dict):
        return "an unknown process"
    return (f"pid {record.get('pid')} on host {record.get('host')} since {record.get('started')}"
            + (f" ({record['command']})" if record.get("command") else ""))


def _alive(pid):
    """Whether process ``pid`` of this host exists (a garbled pid: no)."""
    try:
        pid = int(pid)
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except (ProcessLookupError, TypeError, ValueError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


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

    def _judge(self, fd, exclusive):
        """Lock ``fd`` (without waiting) and return the previous holder's record; refuse when a live
        process holds the directory. Where the file system has no record locks, the record decides:
        a live pid of this host holds it."""
        try:
            fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            locks = True
        except OSError as exc:
            if exc.errno in _BUSY:
                self._refuse(_read_record(fd))
            if exc.errno not in _NO_LOCKS:
                raise UserError(f"lock file {self.path} cannot be locked ({exc.strerror})") from None
            locks = False
        record = _read_record(fd)
        if isinstance(record, dict) and record.get("host") != socket.gethostname():
            self._refuse(record, why=", which cannot be checked from this host; delete the lock file if that run "
                                     "has ended, or")
        if not locks and isinstance(record, dict) and record.get("pid") != os.getpid() and _alive(record.get("pid")):
            self._refuse(record)
        return record

    def check(self):
        """Refuse now if another live process holds the lock; reads only (a fail-fast check before
        the slow part of a start-up; :meth:`acquire` decides)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise UserError(f"lock file {self.path} cannot be read ({exc.strerror}); expected a file this user "
                            f"can read and write") from None
        try:
            self._judge(fd, exclusive=False)
        finally:
            os.close(fd)  # drops the shared lock

    def acquire(self):
        """Take the lock; return a line for the run's log when a stale lock was taken over, else None."""
        for _ in range(10):  # retried only when the file was replaced while we locked it
            try:  # mode 0666 less the umask: in a group-shared folder another user can take a stale lock over
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise UserError(f"lock file {self.path} cannot be opened for writing ({exc.strerror}); expected "
                                f"a file this user can read and write") from None
            try:
                record = self._judge(fd, exclusive=True)
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # the previous holder deleted it between our open and lock
                same_file = False
            except BaseException:
                os.close(fd)
                raise
            if not same_file:
                os.close(fd)
                continue
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
