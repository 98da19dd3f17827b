"""ONNX form of `adaptc::fused_moe` for `adaptc.export_onnx`: standard ops, every expert on every token.

The op receives the routing already made (top-k ids and weights), while onnxruntime's com.microsoft MoE
routes from logits itself, so the expansion is standard ONNX: the tokens through all experts as two
batched MatMuls ([E, T, ·]; E/k times the routed work, but dense GEMMs and no per-pair weight copies),
then the top-k weights scattered into a dense [T, E] matrix and the experts summed with it. The combine
runs in float32 and is cast back once, as the reference does.
"""
from __future__ import annotations

from onnxscript import opset23 as op

FLOAT = 1


def onnx_fused_moe(hidden, topk_weights, topk_ids, w13, w2, activation: str, gated: bool):
    h = op.MatMul(hidden, op.Transpose(w13, perm=[0, 2, 1]))          # [E, T, 2I] or [E, T, I]
    if gated:
        gate, up = op.Split(h, axis=-1, num_outputs=2)
        h = op.Mul(_activation(gate, activation), up)
    else:
        h = _activation(h, activation)
    y = op.Cast(op.MatMul(h, op.Transpose(w2, perm=[0, 2, 1])), to=FLOAT)  # [E, T, H]
    shape = op.Concat(op.Shape(hidden, start=0, end=1), op.Shape(w13, start=0, end=1), axis=0)
    dense = op.ScatterElements(op.ConstantOfShape(shape), op.Cast(topk_ids, to=7), op.Cast(topk_weights, to=FLOAT),
                               axis=1, reduction="add")              # [T, E]
    per_expert = op.Unsqueeze(op.Transpose(dense, perm=[1, 0]), op.Constant(value_ints=[-1]))
    out = op.ReduceSum(op.Mul(y, per_expert), op.Constant(value_ints=[0]), keepdims=0)
    return op.CastLike(out, hidden)


def _activation(x, name: str):
    if name == "silu":
        return op.Mul(x, op.Sigmoid(x))
    if name == "gelu":
        return op.Gelu(x)
    if name == "gelu_tanh":
        return op.Gelu(x, approximate="tanh")
    if name == "relu":
        return op.Relu(x)
    raise ValueError(f"adaptc::fused_moe activation {name!r} has no ONNX form")
