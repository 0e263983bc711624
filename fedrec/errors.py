"""Named exceptions. Every user-facing failure is one of these, with a message that says
which file, line or key was wrong and what was expected."""


class FedrecError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits non-zero."""

    exit_code = 2


class DataError(FedrecError):
    """A data file is missing, unreadable or malformed."""


class ConfigError(FedrecError):
    """A configuration key is unknown, has the wrong type or is out of range."""


class DownloadError(FedrecError):
    """A dataset could not be downloaded or failed its checksum."""


class StateError(FedrecError):
    """A state or checkpoint file is corrupted, foreign or of an unknown version."""
