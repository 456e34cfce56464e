"""The one exception type for mistakes a user can make.

The CLI turns it into a single `error: ...` line on stderr and exit status 2; library callers can catch it.
"""


class UserError(Exception):
    """Bad input: a config key, a path, a corpus, a checkpoint that does not fit the run."""
