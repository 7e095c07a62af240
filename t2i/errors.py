"""The one base class of every error a user can fix (a bad path, config key, caption or
checkpoint). Entry points print these as one line and exit 2; anything else is a bug in
t2i or a library and keeps its traceback."""


class T2IError(ValueError):
    """Input that t2i refuses, with a message that says what to change."""
