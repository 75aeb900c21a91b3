"""User errors: bad input or a refused request, which `pertvl.cli.main` reports as one line
`pertvl: error: MESSAGE` and exit code 2 (the traceback only with --debug or PERTVL_DEBUG=1).
Raise one where input enters, naming the thing and the fix; anything else keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (the message says how); the CLI exits with `exit_code`."""

    exit_code = 2

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(UserError, KeyError, TypeError, ValueError):
    """A config file or override that cannot be used: an unknown key (a KeyError for callers that
    catch those), a value of the wrong type (TypeError) or an unreadable file (ValueError)."""


class DamagedDataError(UserError):
    """A shard whose size, checksum or contents do not match its manifest (names shard and sample)."""


class NotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or lacks what the command needs)."""
