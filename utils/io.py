"""Files written so that a reader never sees half of one: :func:`atomic_write` (checkpoints, STAR,
CSV, YAML, PNG, JSON), :func:`write_json`, and ``results.json`` as a JSON list that is valid
after every append (:class:`ResultsFile`)."""
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from utils.errors import UserError
from utils.interrupt import finish_before_stopping

# A write that fails with one of these found the disk (or the user's quota) full.
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_full(exc):
    """Whether ``exc`` or an exception it arose from is a full disk (torch.save reports the file's
    ``OSError`` as a ``RuntimeError`` of its zip writer)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _size(n):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def disk_full_error(path, written=None):
    """The :class:`UserError` for a write of ``path`` that found no space left: the path, how much of
    it was written (``written`` bytes) and the free space once the partial file is gone."""
    path = Path(path)
    try:
        free = f"{_size(shutil.disk_usage(path.parent).free)} free in {path.parent} now"
    except OSError:
        free = f"free space in {path.parent} unknown"
    done = f"{_size(written)} written when the disk was full, " if written is not None else ""
    return UserError(f"{path}: cannot be written: no space left on device ({done}{free}); {path.name} is left as "
                     f"it was: free some space and run the command again")


def atomic_write(path, write_fn, mode="wb"):
    """Write a file through ``write_fn(fileobj)`` so readers never see a half-written file.

    The data goes to a temporary file in the same directory, is flushed to disk, then
    replaces ``path`` in one ``os.replace``: an interrupted write leaves the old file intact.
    Ctrl-C, SIGTERM and SIGHUP wait until the file is complete (or the temporary file removed
    after an error), then stop the command (:func:`utils.interrupt.finish_before_stopping`). A
    full disk is a :class:`UserError` naming ``path`` and the free space.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with finish_before_stopping():
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            if _disk_full(exc):
                raise disk_full_error(path) from None
            raise
        try:
            os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual file mode
            with os.fdopen(fd, mode) as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            written = os.path.getsize(tmp) if os.path.exists(tmp) else None
            if written is not None:
                os.unlink(tmp)
            if _disk_full(exc):
                raise disk_full_error(path, written) from None
            raise


def to_json_safe(obj):
    """Plain-JSON copy of ``obj``: numpy/torch values become Python ones, NaN/inf become null.

    Strict JSON has no NaN; ``null`` keeps the file readable by every JSON parser.
    """
    if isinstance(obj, dict):
        return {str(k): to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class ResultsFile:
    """Append records to a JSON list file, rewriting it atomically each time.

    The reference code appended objects after the closing bracket, which left an invalid
    file; here every write produces a complete list, so the file can be read at any moment.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.records = []
        if self.path.exists():
            try:
                self.records = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{self.path} is not valid JSON ({exc}); move it away to start a new list") from None
            if not isinstance(self.records, list):
                raise UserError(f"{self.path} holds a JSON {type(self.records).__name__}, expected a list")

    def append(self, record):
        self.records.append(record)
        self._write()

    def truncate_after(self, epoch):
        """Drop records of epochs after ``epoch``: a resumed run redoes those epochs."""
        kept = [r for r in self.records if r.get("epoch", -1) <= epoch]
        if len(kept) != len(self.records):
            self.records = kept
            self._write()

    def _write(self):
        write_json(self.path, self.records)


def write_json(path, obj):
    """Write ``obj`` as strict JSON (NaN -> null, see :func:`to_json_safe`), atomically."""
    text = json.dumps(to_json_safe(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w")
