"""The one exception type for mistakes a user can make.

The CLI turns it into a single `error: ...` line on stderr and exit status 2; library callers can catch it.
"""


class UserError(Exception):
    """Bad input: a config key, a path, a corpus, a checkpoint that does not fit the run."""


def check_choice(key: str, value, allowed) -> None:
    """Refuse a value outside a fixed set, naming the key, the choices and what was given."""
    if value not in allowed:
        raise UserError(f"{key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
