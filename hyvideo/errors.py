"""The one exception type users see.

Every layer raises `HyVideoError` for problems a user can fix (bad input, missing weights, a profile
that does not fit). The CLI turns it into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""


class HyVideoError(Exception):
    """A problem the user can act on; the message says what to do."""
