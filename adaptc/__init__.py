"""adaptc: an adaptive-computation compiler for PyTorch and ONNX models.

    import adaptc
    fast = adaptc.compile(model, example_inputs=(ids,))
    adaptc.report(fast); adaptc.save(fast, "m.adaptc"); adaptc.load("m.adaptc")

Importing adaptc is cheap and never touches a GPU: the pipeline loads on first use.
"""
from ._version import VERSION as __version__
from .errors import AdaptcError, CaptureError, SaveLoadError, VerificationError

__all__ = ["compile", "report", "save", "load", "AdaptcError", "CaptureError", "SaveLoadError", "VerificationError"]


def compile(model, example_inputs=None, passes=None, calibration=None, quality=None, device=None, **options):
    from .api import compile as _compile

    return _compile(model, example_inputs, passes, calibration, quality, device, **options)


def report(module):
    from .api import report as _report

    return _report(module)


def save(module, path):
    from .runtime.serialize import save as _save

    return _save(module, path)


def load(path, map_location=None):
    from .runtime.serialize import load as _load

    return _load(path, map_location=map_location)


compile.__doc__ = "See adaptc.api.compile."
