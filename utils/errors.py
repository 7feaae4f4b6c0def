"""User-facing errors: bad input ends a run with one line, a non-zero exit and no traceback."""
import functools
import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error in the user's input (file, column, key or value), reported in one line."""


def exit_on_user_error(func):
    """Decorate an entry point so a :class:`UserError` prints ``error: ...`` and exits with 2.

    Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            message = " ".join(str(exc).split())  # one line, even when a library's text had newlines
            print(f"error: {message}", file=sys.stderr)
            raise SystemExit(EXIT_USER_ERROR) from None

    return wrapper
