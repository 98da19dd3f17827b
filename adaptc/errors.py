"""The errors a user sees. Each says what went wrong and what was tried, never a deep traceback."""


class AdaptcError(Exception):
    """Base class of every error adaptc raises on purpose."""


class CaptureError(AdaptcError):
    """The model (or a block of it) could not be captured as a graph."""


class VerificationError(AdaptcError):
    """A rewrite does not compute what the original computed."""


class CacheError(AdaptcError):
    """The tuning cache could not be read or written."""


class StorageError(AdaptcError):
    """The Optuna storage that tuning workers share could not be opened or reached."""


class SaveLoadError(AdaptcError):
    """A saved module is missing, corrupt, or from an incompatible version."""
