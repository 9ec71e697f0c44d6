"""The one exception type users see.

Every layer raises `HyVideoError` for problems a user can fix (bad input, missing weights, a profile
that does not fit). The CLI turns it into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class HyVideoError(Exception):
    """A problem the user can act on; the message says what to do."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """"TypeName: message" on one line and at most `limit` characters, for quoting a library's
    error inside a HyVideoError (its text may span lines or be very long)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:limit]
