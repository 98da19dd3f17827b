"""The attention rule on tiny hand-built graphs: structure (fused op in, old ops out), numerics, declines."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from adaptc.passes.onnx import AttentionFusion, apply_rules
from adaptc.passes.onnx.cleanup import cleanup, prune, upgrade_opset

B, S, H, D = 2, 7, 4, 8


def eager_attention_graph(softmax_axis: int = -1, scale_op: str = "Div") -> onnx.ModelProto:
    """What eager BERT attention exports to: split heads, Q·K^T / sqrt(D) + mask, Softmax, ·V, merge heads."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, ["b", "s", H * D]) for n in ("q", "k", "v")]
    inputs.append(helper.make_tensor_value_info("mask", f, ["b", 1, 1, "s"]))
    scale = np.float32(np.sqrt(D) if scale_op == "Div" else 1 / np.sqrt(D))
    inits = [helper.make_tensor("split", TensorProto.INT64, [4], [0, 0, H, D]),
             helper.make_tensor("merge", TensorProto.INT64, [3], [0, 0, H * D]),
             helper.make_tensor("scale", f, [], [scale])]
    nodes = []
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [name, "split"], [f"{name}4"]),
                  helper.make_node("Transpose", [f"{name}4"], [f"{name}t"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
              helper.make_node(scale_op, ["scores", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=softmax_axis),
              helper.make_node("MatMul", ["probs", "vt"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge"], ["out"])]
    graph = helper.make_graph(nodes, "attention", inputs, [helper.make_tensor_value_info("out", f, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {n: rng.standard_normal((B, S, H * D)).astype(np.float32) for n in ("q", "k", "v")}
    mask = np.zeros((B, 1, 1, S), np.float32)
    mask[1, ..., -3:] = -10000.0  # padding: the last three keys of the second sequence
    out["mask"] = mask
    return out


def run(model: onnx.ModelProto) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds())[0]


def fuse(proto: onnx.ModelProto, target: str):
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    if target == "standard":
        model = upgrade_opset(model, 23)
        cleanup(model)
    results = apply_rules(model, [AttentionFusion(target)])
    prune(model)
    return ir.serde.serialize_model(model), results[0]


@pytest.mark.parametrize("target,fused", [("standard", ("", "Attention")),
                                          ("onnxruntime", ("com.microsoft", "MultiHeadAttention"))])
@pytest.mark.parametrize("scale_op", ["Div", "Mul"])
def test_eager_attention_is_fused(target, fused, scale_op):
    original = eager_attention_graph(scale_op=scale_op)
    converted, result = fuse(original, target)
    assert result.fired == 1 and not result.declined
    ops = [(n.domain, n.op_type) for n in converted.graph.node]
    assert fused in ops
    assert not {"Softmax", "MatMul", "Div"} & {op for _, op in ops}  # the old subgraph is gone
    expected, actual = run(original), run(converted)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_softmax_over_queries_is_not_attention_over_keys():
    """Must not fire: the same graph with Softmax over axis 2 normalises over queries."""
    converted, result = fuse(eager_attention_graph(softmax_axis=2), "standard")
    assert result.fired == 0
    assert "axis 2" in result.declined[0]["reason"]
    assert "Softmax" in [n.op_type for n in converted.graph.node]
    np.testing.assert_allclose(run(converted), run(eager_attention_graph(softmax_axis=2)), rtol=1e-6)


def test_softmax_that_feeds_no_matmul_is_not_a_site():
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], "router",
                              [helper.make_tensor_value_info("x", f, [3, 5])], [helper.make_tensor_value_info("y", f, [3, 5])])
    _, result = fuse(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), "standard")
    assert result.fired == 0 and result.declined == []
