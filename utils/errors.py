"""User-facing errors: bad input ends a run with one line, a non-zero exit and no traceback."""
import argparse
import functools
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error in the user's input (file, column, key or value), reported in one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line too: ``error: argument --lr: ... (see main.py --help)``
    and exit code 2, without the usage block."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def exit_on_user_error(func):
    """Decorate an entry point ``main(argv=None)`` so that its run ends in one line.

    A :class:`UserError` prints ``error: ...`` and exits with 2; Ctrl-C, SIGTERM and SIGHUP
    (:func:`utils.interrupt.stop_signals`) print ``interrupted: ...`` (a run's own
    :class:`~utils.interrupt.Interrupted` message, or the command that runs it again) and exit with
    128 + the signal's number (130, 143, 129). Anything else is a bug and keeps its traceback.
    """
    from utils.interrupt import Interrupted, rerun_line, stop_signals, stopped_by

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with stop_signals():
                return func(*args, **kwargs)
        except UserError as exc:
            message = " ".join(str(exc).split())  # one line, even when a library's text had newlines
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None
        except Interrupted as exc:
            print(f"interrupted: {exc}", file=sys.stderr)
            raise SystemExit(exc.code) from None
        except KeyboardInterrupt as exc:
            argv = kwargs.get("argv", args[0] if args else None)
            script = getattr(sys.modules.get(func.__module__), "__file__", None) or sys.argv[0]
            print(f"interrupted: {rerun_line(exc, script, argv)}", file=sys.stderr)
            raise SystemExit(stopped_by(exc)[1]) from None

    return wrapper
