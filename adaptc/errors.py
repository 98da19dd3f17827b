"""The errors a user sees. Each says what went wrong and what was tried, never a deep traceback."""
import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def caller_stacklevel() -> int:
    """The warnings.warn stacklevel of the first frame outside adaptc, for the function that calls
    this: a warning points at the user's line, not at whichever step of compile noticed."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


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
