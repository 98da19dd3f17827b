"""ONNX form of `adaptc::linear` for `adaptc.export_onnx`: MatMul with the transposed weight, plus the bias
(onnxruntime picks its own GEMM, so the choice the tuner made on this machine does not travel)."""
from __future__ import annotations

from onnxscript import opset23 as op


def onnx_linear(x, weight, bias=None):
    out = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return out if bias is None else op.Add(out, bias)
