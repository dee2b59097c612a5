"""User-facing errors: one sentence naming the file, key or value and what was expected.

The CLI turns a `UserError` into a single `error: ...` line and exit code 2; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (path, config key, data file). Message is shown as-is."""
