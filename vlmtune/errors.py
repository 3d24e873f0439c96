"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (file, record, option); the message says what to fix."""
