"""The MoE rule on tiny hand-built graphs (HF batched_mm as the dynamo exporter spells it): structure,
numerics against the original and against numpy, and the sites where it must not fire."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from adaptc.passes.onnx import MoEFusion, apply_rules
from adaptc.passes.onnx.cleanup import cleanup, prune

N, H, I, E, K = 11, 16, 8, 4, 2
FUSED_OP = {"standard": ("", "ScatterND"), "onnxruntime": ("com.microsoft", "MoE")}


def weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((H, E)).astype(np.float32),            # router (MatMul layout)
            (0.3 * rng.standard_normal((E, 2 * I, H))).astype(np.float32),  # gate_up_proj, rows [gate | up]
            (0.3 * rng.standard_normal((E, H, I))).astype(np.float32))      # down_proj


def moe_graph(normalize: bool = True, activation: str = "swiglu", repeat_axis: int = 1,
              gather_nd: bool = False) -> onnx.ModelProto:
    """x (N, H) → router Softmax/TopK → batched_mm experts → (N, H). `repeat_axis=0` tiles the tokens
    block-wise instead of repeating each in place (not what the routing pairs mean)."""
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    router, gate_up, down = weights()
    inits = [numpy_helper.from_array(router, "router"), numpy_helper.from_array(gate_up, "gate_up"),
             numpy_helper.from_array(down, "down"), helper.make_tensor("k", i64, [1], [K]),
             helper.make_tensor("flat", i64, [1], [-1]), helper.make_tensor("ax1", i64, [1], [1]),
             helper.make_tensor("ax_last", i64, [1], [-1]), helper.make_tensor("ax0", i64, [1], [0]),
             helper.make_tensor("pairs_h", i64, [2], [-1, H]), helper.make_tensor("nkh", i64, [3], [-1, K, H]),
             helper.make_tensor("expand", i64, [3], [1, K, 1] if repeat_axis == 1 else [K, 1, 1])]
    nodes = [helper.make_node("MatMul", ["x", "router"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node("TopK", ["probs", "k"], ["top_w", "top_i"], axis=-1),
             helper.make_node("Reshape", ["top_i", "flat"], ["ids"])]
    if normalize:
        nodes += [helper.make_node("ReduceSum", ["top_w", "ax_last"], ["top_sum"], keepdims=1),
                  helper.make_node("Div", ["top_w", "top_sum"], ["route_w"])]
    route_w = "route_w" if normalize else "top_w"
    nodes += [helper.make_node("Unsqueeze", ["x", "ax1" if repeat_axis == 1 else "ax0"], ["x3"]),
              helper.make_node("Tile", ["x3", "expand"], ["x_rep3"]),
              helper.make_node("Reshape", ["x_rep3", "pairs_h"], ["x_rep"])]
    for name, table, vec in (("up", "gate_up", "x_rep"), ("dn", "down", "act")):
        if gather_nd:
            nodes += [helper.make_node("Unsqueeze", ["ids", "ax_last"], [f"{name}_ids"]),
                      helper.make_node("GatherND", [table, f"{name}_ids"], [f"{name}_w"])]
        else:
            nodes.append(helper.make_node("Gather", [table, "ids"], [f"{name}_w"], axis=0))
        nodes += [helper.make_node("Unsqueeze", [vec, "ax_last"], [f"{name}_v"]),
                  helper.make_node("MatMul", [f"{name}_w", f"{name}_v"], [f"{name}_mm"]),
                  helper.make_node("Squeeze", [f"{name}_mm", "ax_last"], [f"{name}_out"])]
        if name == "up":
            nodes.append(helper.make_node("Split", ["up_out"], ["gate", "upv"], axis=1, num_outputs=2))
            if activation == "swiglu":
                nodes += [helper.make_node("Sigmoid", ["gate"], ["sig"]),
                          helper.make_node("Mul", ["gate", "sig"], ["silu"]),
                          helper.make_node("Mul", ["silu", "upv"], ["act"])]
            else:  # GELU(gate)·up: ORT's CPU MoE has no GEGLU kernel, and the standard form assumes SiLU
                nodes += [helper.make_node("Gelu", ["gate"], ["gelu"]),
                          helper.make_node("Mul", ["gelu", "upv"], ["act"])]
    nodes += [helper.make_node("Reshape", [route_w, "flat"], ["w_flat"]),
              helper.make_node("Unsqueeze", ["w_flat", "ax_last"], ["w_col"]),
              helper.make_node("Mul", ["dn_out", "w_col"], ["weighted"]),
              helper.make_node("Reshape", ["weighted", "nkh"], ["per_slot"]),
              helper.make_node("ReduceSum", ["per_slot", "ax1"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "moe", [helper.make_tensor_value_info("x", f, ["n", H])],
                              [helper.make_tensor_value_info("y", f, ["n", H])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def numpy_moe(x: np.ndarray, normalize: bool) -> np.ndarray:
    router, gate_up, down = weights()
    logits = x @ router
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :K]
    w = np.take_along_axis(p, top, -1)
    if normalize:
        w /= w.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for n in range(len(x)):
        for slot in range(K):
            h = gate_up[top[n, slot]] @ x[n]
            gate, up = h[:I], h[I:]
            y[n] += w[n, slot] * (down[top[n, slot]] @ (gate / (1 + np.exp(-gate)) * up))
    return y


def inputs(seed: int = 1, n: int = N) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, H)).astype(np.float32)}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def fuse(proto: onnx.ModelProto, target: str):
    model = ir.serde.deserialize_model(proto)
    cleanup(model)
    result = apply_rules(model, [MoEFusion(target)])[0]
    prune(model)
    return ir.serde.serialize_model(model), result


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
@pytest.mark.parametrize("normalize,gather_nd", [(True, False), (False, True)])
def test_batched_mm_experts_are_fused(target, normalize, gather_nd):
    original = moe_graph(normalize=normalize, gather_nd=gather_nd)
    converted, result = fuse(original, target)
    assert result.fired == 1 and not result.declined
    ops = [(n.domain, n.op_type) for n in converted.graph.node]
    assert FUSED_OP[target] in ops
    # the per-pair weight copies are gone: nothing gathers from a rank-3 expert table any more
    assert "gate_up" not in {i for n in converted.graph.node for i in n.input}
    if target == "onnxruntime":
        assert "TopK" not in {op for _, op in ops}  # the MoE op routes itself
    for feeds in (inputs(1), inputs(2, n=1), inputs(3, n=40)):  # decode-sized and a batch where experts go idle
        expected = run(original, feeds)
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(expected, numpy_moe(feeds["x"], normalize), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(run(converted, feeds), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["standard", "onnxruntime"])
def test_gelu_experts_are_declined_with_the_reason(target):
    original = moe_graph(activation="gelu")
    converted, result = fuse(original, target)
    assert result.fired == 0 and "SiLU(gate)·up" in result.declined[0]["reason"]
    np.testing.assert_allclose(run(converted, inputs()), run(original, inputs()), rtol=1e-6)


def test_block_tiled_tokens_are_not_routing_pairs():
    """Must not fire: Tile along a new axis 0 pairs token n with the wrong routing slot."""
    _, result = fuse(moe_graph(repeat_axis=0), "standard")
    assert result.fired == 0 and "repeated k times" in result.declined[0]["reason"]


def test_topk_that_selects_no_expert_weights_is_not_a_site():
    f = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1)], "sampling",
                              [helper.make_tensor_value_info("x", f, [3, 50])],
                              [helper.make_tensor_value_info("v", f, None), helper.make_tensor_value_info("i", TensorProto.INT64, None)],
                              [helper.make_tensor("k", TensorProto.INT64, [1], [5])])
    _, result = fuse(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), "standard")
    assert result.fired == 0 and result.declined == []
