"""ONNX in: read a model with onnx-ir (external data and >2 GB models included), or say in one line why not.

Every problem a user can cause — a missing file, a file that is not ONNX, a truncated model, an opset or
an operator this pipeline cannot handle — becomes a `CaptureError` whose message names the file and the
problem; the command line turns it into exit code 2.
"""
from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from ..errors import CaptureError

# The passes rewrite Softmax with an explicit axis (opset >= 13 semantics) and emit opset-23 Attention.
MIN_OPSET, MAX_OPSET = 13, 23
KNOWN_DOMAINS = ("", "ai.onnx", "com.microsoft", "ai.onnx.ml")


def load_onnx(path: str | Path) -> ir.Model:
    """The model at `path` as an `onnx_ir.Model`; raises CaptureError naming the problem."""
    path = Path(path)
    if not path.exists():
        raise CaptureError(f"{path}: no such file")
    if not path.is_file():
        raise CaptureError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CaptureError(f"{path}: empty file, not an ONNX model")
    try:
        model = ir.load(path)
    except FileNotFoundError as e:  # the model names an external-data file that is not beside it
        raise CaptureError(f"{path}: external data missing ({e.filename or e})") from None
    except Exception as e:  # protobuf reports truncation and garbage alike as a decode error
        raise CaptureError(f"{path}: not a readable ONNX model ({_first_line(e)}); truncated or not ONNX?") from None
    check_supported(model, path)
    return model


def check_supported(model: ir.Model, path: str | Path) -> None:
    """Refuse what the passes cannot reason about, before any work is done."""
    if len(model.graph) == 0 or not model.graph.outputs:
        raise CaptureError(f"{path}: the graph is empty or has no outputs (truncated or not ONNX?)")
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None:
        raise CaptureError(f"{path}: no default-domain opset import; not a model adaptc can convert")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CaptureError(f"{path}: opset {opset} is not supported (adaptc converts opsets {MIN_OPSET}-{MAX_OPSET})")
    unknown = _unknown_ops(model)
    if unknown:
        raise CaptureError(f"{path}: operators from unknown domains: {', '.join(unknown[:5])}")


def _unknown_ops(model: ir.Model) -> list[str]:
    local = {domain for (domain, _name, _overload) in model.functions}
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.all_nodes()
                   if n.domain not in KNOWN_DOMAINS and n.domain not in local})


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
