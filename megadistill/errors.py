"""The one exception type for user mistakes: the CLI prints its message and exits 2, no traceback."""


class UserError(ValueError):
    """Bad input from the user (file, flag, config value); the message says what is wrong and how to fix it."""
