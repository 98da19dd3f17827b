"""adaptc: an adaptive-computation compiler for PyTorch and ONNX models.

    import adaptc
    fast = adaptc.compile(model, example_inputs=(ids,))
    adaptc.report(fast); adaptc.save(fast, "m.adaptc"); adaptc.load("m.adaptc")
    adaptc.export_onnx(fast, (ids,), "m.onnx")

Importing adaptc is cheap and never touches a GPU: the pipeline loads on first use.
"""
from ._version import VERSION as __version__
from .errors import AdaptcError, CaptureError, SaveLoadError, VerificationError

__all__ = ["compile", "report", "save", "load", "export_onnx", "retarget", "plot_frontier", "AdaptcError", "CaptureError", "SaveLoadError", "VerificationError"]


def __getattr__(name):
    if name == "passes":  # adaptc.passes.EarlyExit(delta=0.05) without importing the subpackage first
        import importlib

        return importlib.import_module(".passes", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compile(model, example_inputs=None, passes=None, calibration=None, quality=None, device=None, **options):
    """Compile `model` into a faster drop-in module; see `adaptc.api.compile` for every argument."""
    from .api import compile as _compile

    return _compile(model, example_inputs, passes, calibration, quality, device, **options)


def report(module):
    """The JSON-serializable report of what compile did (passes, verification, capture, tuning)."""
    from .api import report as _report

    return _report(module)


def save(module, path):
    """Write a compiled module to `path` (a zip of JSON, tensors and an exported program; no pickle)."""
    from .runtime.serialize import save as _save

    return _save(module, path)


def load(path, map_location=None):
    """Read a module written by `save`; raises SaveLoadError for files it cannot trust."""
    from .runtime.serialize import load as _load

    return _load(path, map_location=map_location)


def export_onnx(module, example_inputs=None, path="model.onnx", verify=True):
    """Write a whole-graph compiled module to ONNX, verified in onnxruntime; see `adaptc.export.export_onnx`."""
    from .export import export_onnx as _export_onnx

    return _export_onnx(module, example_inputs, path, verify=verify)


def retarget(module, quality):
    """Move a compiled module to another operating point of its recorded frontier, one certified for
    `quality` (same delta), without re-calibrating; see `adaptc.budget.retarget`."""
    from .budget import retarget as _retarget

    return _retarget(module, quality)


def plot_frontier(module, path):
    """Draw a compiled module's (or a report's) speed-vs-quality frontier to `path`, the chosen point marked."""
    from .budget import plot_frontier as _plot

    return _plot(module, path)
