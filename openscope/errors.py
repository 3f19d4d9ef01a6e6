"""The one exception type a user sees: a clear, one-line message naming the problem.

The CLI prints `error: <message>` for these and exits with status 2, without a traceback;
anything else is a bug and keeps its traceback.
"""


class OpenscopeError(Exception):
    """Bad input or state the user can fix; the message is one line that names the problem."""
