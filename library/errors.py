"""User-facing errors.

Anything a user can fix (a wrong path, a bad option, a malformed TOML) raises a subclass of
`UserError`. Entry scripts catch it and print the message without a traceback.
"""


class UserError(Exception):
    """An error caused by the user's input; the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A bad option, option combination or config-file entry."""


class ModelFileError(UserError):
    """A missing, unreadable or wrong-kind model file."""


class DatasetError(UserError):
    """A bad dataset config or an unusable dataset."""
