"""ONNX form of `adaptc::attention` for `adaptc.export_onnx`: one ONNX `Attention` (opset 23).

The structure arguments (causal, sliding window, key padding, q_offset) become one boolean mask built
from positions, ANDed with the explicit mask, as reference.py spells it out. Queries that see no key give
zeros (the op contract), whatever the runtime's kernel gives there.
"""
from __future__ import annotations

from onnxscript import opset23 as op


def onnx_attention(q, k, v, key_padding, mask, scale: float, causal: bool, window: int, q_offset: int):
    full = _structure_mask(q, k, causal, window, q_offset)
    if key_padding is not None:
        pad = op.Unsqueeze(key_padding, op.Constant(value_ints=[1, 2]))  # [B, 1, 1, Lk]
        full = pad if full is None else op.And(full, pad)
    if mask is not None:
        full = mask if full is None else op.And(full, mask)
    # the tracer gives every declared output (present K/V, scores); export_onnx drops the unused ones
    if full is None:
        return op.Attention(q, k, v, scale=float(scale))[0]
    out = op.Attention(q, k, v, full, scale=float(scale))[0]
    seen = op.ReduceMax(op.Cast(full, to=1), op.Constant(value_ints=[-1]), keepdims=1)  # [B|1, H|1, Lq, 1]
    return op.Where(op.Greater(seen, op.Constant(value_float=0.0)), out, op.CastLike(op.Constant(value_float=0.0), out))


def _structure_mask(q, k, causal: bool, window: int, q_offset: int):
    """[Lq, Lk] bool from positions: query i sits at q_offset + i, key j at j. None when all keys are visible."""
    if not causal and not window:
        return None
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    lq = op.Squeeze(op.Shape(q, start=2, end=3))
    lk = op.Squeeze(op.Shape(k, start=2, end=3))
    pos = op.Unsqueeze(op.Add(op.Range(zero, lq, one), op.Constant(value_int=int(q_offset))), op.Constant(value_ints=[-1]))
    key = op.Unsqueeze(op.Range(zero, lk, one), op.Constant(value_ints=[0]))
    out = op.LessOrEqual(key, pos) if causal else None
    if window:
        in_window = op.Greater(key, op.Sub(pos, op.Constant(value_int=int(window))))
        out = in_window if out is None else op.And(out, in_window)
    return out
