"""The one error type a user can cause. The CLI prints it as one line and exits 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input: a config value, a missing file, a bad version. Message is one line."""
