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


class PrivacyError(FedrecError):
    """An action would break a privacy guarantee (budget, noise secrecy, a node's floor)."""


# Codes a ClientApp sends instead of exception text (which may quote private data).
ERROR_CODES: dict[type[Exception], tuple[int, str]] = {
    DataError: (101, "data"), ConfigError: (102, "config"), StateError: (103, "state"),
    PrivacyError: (104, "privacy"),
}
INTERNAL_ERROR = (100, "internal")


def error_code(err: BaseException) -> tuple[int, str]:
    """(code, short name) of an exception, for replies that must not carry its text."""
    for cls, code in ERROR_CODES.items():
        if isinstance(err, cls):
            return code
    return INTERNAL_ERROR
