"""Checks every command shares: numeric flags (argparse types), values from config files, output folders.

A bad value is refused before any work starts and before anything is written, with one line
that names the flag (or key) and says what was expected.

* ``int_arg(low, high)`` / ``float_arg(low, high, low_open, high_open)`` are argparse ``type=``
  functions: ``--lr nan`` gives ``error: argument --lr: expected a finite number > 0, got 'nan'``.
  NaN and infinities are never accepted.
* :func:`range_problem` checks a value that did not come through argparse (a default taken from
  ``config.py``) against the same range (the types carry theirs in ``.bounds``).
* :func:`check_output_dir` refuses an output location that is a file (or lies below one) or a
  folder in which no file can be created, by creating (and at once deleting) an anonymous
  temporary file in the folder that the command would write to, or in its nearest existing parent.
* :func:`not_a_file` says what an input path is when it is not a regular file (a FIFO would make
  the read wait forever).
"""
import argparse
import math
import os
import stat
import tempfile
from pathlib import Path

from utils.errors import UserError

SEED_MAX = 2**32 - 1  # NumPy's seed range; every seed of this repository must fit in it


def _bound(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def expected_text(integer=False, low=None, high=None, low_open=False, high_open=False):
    """``"an integer >= 1"``, ``"a finite number in (0, 1]"``, ... (what a range check expects)."""
    kind = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{_bound(low)}, {_bound(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {_bound(low)}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {_bound(high)}"
    return kind


def range_problem(value, integer=False, low=None, high=None, low_open=False, high_open=False):
    """None when ``value`` is a finite number (an int when ``integer``; never a bool) in the
    range, else ``"expected <what>, got <value>"``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and isinstance(value, int)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    return None if ok else f"expected {expected_text(integer, low, high, low_open, high_open)}, got {value!r}"


def _arg_type(convert, integer, **bounds):
    def parse(text):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            value = None
        if value is None or range_problem(value, integer, **bounds):
            raise argparse.ArgumentTypeError(f"expected {expected_text(integer, **bounds)}, got {text!r}")
        return value

    parse.__name__ = "integer" if integer else "number"
    parse.bounds = dict(integer=integer, **bounds)
    return parse


def int_arg(low=None, high=None):
    """argparse ``type=``: an integer in ``[low, high]`` (either bound may be None)."""
    return _arg_type(int, True, low=low, high=high)


def float_arg(low=None, high=None, low_open=False, high_open=False):
    """argparse ``type=``: a finite float in the range (``*_open``: the bound is excluded)."""
    return _arg_type(float, False, low=low, high=high, low_open=low_open, high_open=high_open)


def check_output_dir(path, flag):
    """Refuse ``path`` as an output folder unless it is (or can be created as) a writable folder.

    Walks up to the nearest existing folder (``path`` itself when it exists): an existing file on
    the way is an error, and so is a folder in which a file cannot be created (checked by
    creating an anonymous temporary file, which leaves nothing behind). Creates nothing else.
    """
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise UserError(f"{flag} {path}: {probe} is a broken symbolic link; expected a folder")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"lies below {probe}, which is a file"
        raise UserError(f"{flag} {path} {where}; expected a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot create files in {probe} ({exc.strerror or exc}); "
                        f"expected a writable folder") from None


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_a_file(path):
    """What ``path`` is when it is not a regular file (symbolic links followed): "does not exist",
    "is a named pipe (FIFO)", ...; None for a regular file. Opening a FIFO waits for a writer
    forever, so inputs are checked with this before they are opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist" if not os.path.islink(path) else "is a broken symbolic link"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return f"is {kind}, not a regular file"
