"""MoE fusion: router TopK → per-pair expert weights gathered by index → SwiGLU experts → weighted sum.

Anchored on TopK and walked forward along its indices, so one rule covers what both torch exporters
write for Hugging Face's `experts_implementation="batched_mm"` (Mixtral, Qwen-MoE, OLMoE):
- router: Softmax(logits) → TopK(k), optionally renormalised by ReduceSum/Div (`norm_topk_prob`);
- expert weights gathered per (token, expert) pair: Gather(W, idx, axis=0) or GatherND(W, idx[:, None]);
- experts as batched mat-vecs MatMul(W[idx], x[:, :, None]) with gate and up fused in one weight
  ([gate | up] halves, split by Split or two Slices), SiLU(gate) · up, then the down projection;
- tokens repeated k times (Unsqueeze/Expand/Reshape or Unsqueeze/Tile/Flatten), the pair outputs
  scaled by their routing weight, reshaped to (tokens, k, hidden) and summed over k.

The batched_mm form copies each expert's weights once per (token, expert) pair: k·tokens weight copies.
Targets:
- `onnxruntime`: com.microsoft `MoE` (its CPU kernel: softmax over the router logits, top-k, optional
  renormalisation, SwiGLU with gate/up interleaved — the weights are re-laid out once here).
- `standard`: one block per expert: the pairs routed to it (NonZero), its tokens gathered, two plain
  MatMuls against that expert's own weights, and one ScatterND(add) of all weighted rows into the output.
  Only the routed experts are computed and no weight is copied per pair.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._rule import Decline, OnnxRule, const, ints, producer, rank, replace_output

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class MoESite:
    x: ir.Value               # (tokens, hidden): what the experts read
    logits: ir.Value          # (tokens, experts): the router's Softmax input
    k: int
    normalize: bool           # top-k weights renormalised to sum to 1
    fc1: np.ndarray           # (experts, 2·inter, hidden), rows [gate | up]
    fc2: np.ndarray           # (experts, hidden, inter)
    indices: ir.Value         # (tokens, k) from TopK: the standard form reuses the graph's routing
    weights: ir.Value         # (tokens, k) routing weights as the graph computes them
    out: ir.Value             # (tokens, hidden): the weighted sum the fused op replaces


class MoEFusion(OnnxRule):
    name = "moe_fusion"
    anchor = "TopK"
    needs_opset = 16  # for the standard target: ScatterND(reduction="add")

    def prepare(self, model: ir.Model) -> None:
        self.opset = model.opset_imports.get("", 0)

    # -- match ------------------------------------------------------------------------------------
    def match(self, topk: ir.Node) -> MoESite | None:
        gathers = _expert_gathers(topk.outputs[1])
        if not gathers:
            return None  # top-k that selects no expert weights: sampling, beam search, not an MoE
        if len(gathers) != 2:
            raise Decline(f"TopK indices gather {len(gathers)} expert weights; expected 2 (fused gate|up, down)")
        k = _const_ints(topk.inputs[1])
        if k is None or len(k) != 1 or topk.attributes.get_int("largest", 1) != 1 \
                or topk.attributes.get_int("axis", -1) not in (-1, 1):
            raise Decline("TopK is not a constant-k largest top-k over the expert axis")
        k = k[0]
        softmax = producer(topk.inputs[0], "Softmax")
        if softmax is None or softmax.attributes.get_int("axis", -1) not in (-1, 1):
            raise Decline("TopK does not read Softmax(router logits) over the expert axis")
        logits = softmax.inputs[0]

        first, second = (_expert_matvec(w, g) for w, g in gathers)
        act = _swiglu(first, second) or _swiglu(second, first)
        if act is None:
            raise Decline("the experts are not SiLU(gate)·up over one fused [gate | up] weight "
                          "(another activation, separate gate/up weights, or biases)")
        fc1, fc2 = act
        x = _repeated_rows(fc1.vec_in, k)
        if x is None:
            raise Decline("cannot see which tokens the experts read: not each token repeated k times in order")
        if not _reads(logits, x):
            raise Decline("the router and the experts read different tensors")
        values, normalize = _routing_weights(topk)
        out = _weighted_sum(fc2.out, values, k)
        if out is None:
            raise Decline("the expert outputs are not scaled by the top-k weights and summed over k")
        w1, w2 = fc1.weight_out_in(), fc2.weight_out_in()
        experts, inter = w1.shape[0], w2.shape[2]
        if w1.shape[1] != 2 * inter or w2.shape[1] != w1.shape[2] or w2.shape[0] != experts:
            raise Decline(f"expert weight shapes {w1.shape} and {w2.shape} do not chain")
        if x.dtype not in FLOAT_TYPES:
            raise Decline(f"experts of type {x.dtype}: MoE ops take floats")
        if self.target == "onnxruntime" and x.dtype != ir.DataType.FLOAT:
            raise Decline(f"onnxruntime's CPU MoE takes float32, not {x.dtype}")
        if self.target == "standard" and self.opset < 16:
            raise Decline(f"opset {self.opset}: the standard form needs ScatterND with reduction (opset 16)")
        return MoESite(x, logits, k, normalize, w1, w2, topk.outputs[1], values, out)

    # -- rewrite ----------------------------------------------------------------------------------
    def rewrite(self, graph: ir.Graph, topk: ir.Node, site: MoESite) -> None:
        anchor = site.out.producer()
        new = self._ort_moe(graph, site) if self.target == "onnxruntime" else self._per_expert(graph, site)
        graph.insert_before(anchor, new)
        replace_output(graph, site.out, new[-1].outputs[0])

    def _ort_moe(self, graph: ir.Graph, site: MoESite) -> list[ir.Node]:
        experts, two_inter, hidden = site.fc1.shape
        inter = two_inter // 2
        # the CPU kernel only takes gate/up interleaved row by row: [g0, u0, g1, u1, …]
        interleaved = np.stack([site.fc1[:, :inter], site.fc1[:, inter:]], axis=2).reshape(experts, two_inter, hidden)
        dtype = site.x.dtype.numpy()
        fc1 = const(graph, "adaptc_moe_fc1", np.ascontiguousarray(interleaved, dtype))
        fc2 = const(graph, "adaptc_moe_fc2", np.ascontiguousarray(site.fc2, dtype))
        attrs = {"k": ir.AttrInt64("k", site.k), "activation_type": ir.AttrString("activation_type", "swiglu"),
                 "swiglu_fusion": ir.AttrInt64("swiglu_fusion", 1),
                 "normalize_routing_weights": ir.AttrInt64("normalize_routing_weights", int(site.normalize)),
                 "activation_alpha": ir.AttrFloat32("activation_alpha", 1.0),  # plain SiLU: sigmoid(1·g)
                 "activation_beta": ir.AttrFloat32("activation_beta", 0.0)}
        node = ir.Node("com.microsoft", "MoE", [site.x, site.logits, fc1, None, fc2], attrs,
                       name=f"{site.out.producer().name or 'moe'}/adaptc_MoE")
        return [node]

    def _per_expert(self, graph: ir.Graph, site: MoESite) -> list[ir.Node]:
        experts, two_inter, _ = site.fc1.shape
        inter = two_inter // 2
        dtype = site.x.dtype.numpy()
        new: list[ir.Node] = []

        def op(op_type, *inputs, **attrs):
            node = ir.Node("", op_type, list(inputs), [_attr(n, v) for n, v in attrs.items()])
            new.append(node)
            return node.outputs[0]

        flat = const(graph, "adaptc_flat", np.array([-1], np.int64))
        last = const(graph, "adaptc_last_axis", np.array([-1], np.int64))
        pair_ids = op("Reshape", site.indices, flat)         # (pairs,) expert of each (token, slot)
        pair_weights = op("Reshape", site.weights, flat)     # (pairs,)
        k = const(graph, "adaptc_moe_k", np.array(site.k, np.int64))
        rows, values = [], []
        for e in range(experts):
            w_up = const(graph, f"adaptc_moe_e{e}_gate_up", np.ascontiguousarray(site.fc1[e].T, dtype))  # (hidden, 2·inter)
            w_down = const(graph, f"adaptc_moe_e{e}_down", np.ascontiguousarray(site.fc2[e].T, dtype))   # (inter, hidden)
            hit = op("Equal", pair_ids, const(graph, f"adaptc_moe_e{e}", np.array(e, np.int64)))
            pairs = op("Reshape", op("NonZero", hit), flat)   # the pairs routed to expert e
            token = op("Div", pairs, k)
            h = op("MatMul", op("Gather", site.x, token, axis=0), w_up)
            split = ir.Node("", "Split", [h, const(graph, "adaptc_moe_halves", np.array([inter, inter], np.int64))],
                            [ir.AttrInt64("axis", -1)], num_outputs=2)
            new.append(split)
            gate, up = split.outputs
            act = op("Mul", op("Mul", gate, op("Sigmoid", gate)), up)
            y = op("MatMul", act, w_down)
            values.append(op("Mul", y, op("Unsqueeze", op("Gather", pair_weights, pairs, axis=0), last)))
            rows.append(op("Unsqueeze", token, last))
        zeros = op("ConstantOfShape", op("Shape", site.x),
                   value=ir.tensor(np.zeros(1, dtype)))
        op("ScatterND", zeros, op("Concat", *rows, axis=0), op("Concat", *values, axis=0), reduction="add")
        return new

    def finish(self, model: ir.Model, fired: int) -> None:
        if fired and self.target == "onnxruntime":
            model.opset_imports.setdefault("com.microsoft", 1)


# -- the spellings, one helper each ---------------------------------------------------------------

@dataclass
class _MatVec:
    weight: np.ndarray   # the stacked expert weights as the graph holds them
    out_in: bool         # (experts, out, in) when True, (experts, in, out) when False
    vec_in: ir.Value     # (pairs, in)
    out: ir.Value        # (pairs, out)

    def weight_out_in(self) -> np.ndarray:
        return self.weight if self.out_in else self.weight.transpose(0, 2, 1)


def _expert_gathers(indices: ir.Value) -> list[tuple[np.ndarray, ir.Value]]:
    """(stacked weights, gathered per-pair weights) for each rank-3 constant the top-k indices select from."""
    found, frontier = [], [indices]
    for _ in range(3):  # through the Reshape to (pairs,) and GatherND's Unsqueeze
        nxt = []
        for value in frontier:
            for use in value.uses():
                node = use.node
                if node.op_type in ("Reshape", "Unsqueeze", "Flatten", "Squeeze") and use.idx == 0:
                    nxt.append(node.outputs[0])
                elif node.op_type in ("Gather", "GatherND") and use.idx == 1:
                    table = ir.convenience.get_const_tensor(node.inputs[0])
                    if table is None or len(table.shape) != 3:
                        continue
                    if node.op_type == "Gather" and (node.attributes.get_int("axis", 0) != 0 or rank(value) != 1):
                        continue
                    if node.op_type == "GatherND" and (node.attributes.get_int("batch_dims", 0) != 0
                                                       or rank(value) != 2 or value.shape[1] != 1):
                        continue
                    found.append((table.numpy(), node.outputs[0]))
        frontier = nxt
    return found


def _expert_matvec(weight: np.ndarray, gathered: ir.Value) -> _MatVec:
    """MatMul(W[idx], x[:, :, None]) → Squeeze(-1), or MatMul(x[:, None, :], W[idx]) → Squeeze(1)."""
    uses = list(gathered.uses())
    matmul = uses[0].node if len(uses) == 1 and uses[0].node.op_type == "MatMul" else None
    if matmul is None:
        raise Decline("gathered expert weights do not feed one batched MatMul")
    out_in = matmul.inputs[0] is gathered
    vec_axis = 2 if out_in else 1
    unsq = producer(matmul.inputs[1 if out_in else 0], "Unsqueeze")
    squeeze_users = [u.node for u in matmul.outputs[0].uses()]
    if unsq is None or _const_ints(unsq.inputs[1]) not in ([vec_axis], [vec_axis - 3]) \
            or len(squeeze_users) != 1 or squeeze_users[0].op_type != "Squeeze":
        raise Decline("the batched expert MatMul is not a per-pair matrix-vector product")
    return _MatVec(weight, out_in, unsq.inputs[0], squeeze_users[0].outputs[0])


def _swiglu(fc1: _MatVec, fc2: _MatVec) -> tuple[_MatVec, _MatVec] | None:
    """(fc1, fc2) if fc2 reads SiLU(gate)·up where gate and up are the halves of fc1's output."""
    mul = producer(fc2.vec_in, "Mul")
    if mul is None:
        return None
    halves = _halves(fc1.out)
    if halves is None:
        return None
    gate, up = halves
    for a, b in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
        silu = producer(a, "Mul")
        if silu is None or b is not up:
            continue
        x0, x1 = silu.inputs
        sig = producer(x1, "Sigmoid") or producer(x0, "Sigmoid")
        if sig is not None and sig.inputs[0] is gate and gate in (x0, x1):
            return fc1, fc2
    return None


def _halves(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(first, second) halves of `value` along its last axis, by Split or by two Slices."""
    width = value.shape[-1] if value.shape is not None else None
    users = [u.node for u in value.uses()]
    split = next((n for n in users if n.op_type == "Split"), None)
    if split is not None and len(split.outputs) == 2 and split.attributes.get_int("axis", 0) in (-1, 1):
        sizes = _const_ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        if sizes is None or sizes[0] == sizes[1]:
            return split.outputs[0], split.outputs[1]
    slices = {}
    for node in users:
        if node.op_type != "Slice" or len(node.inputs) < 4:
            continue
        starts, ends, axes = (_const_ints(node.inputs[i]) for i in (1, 2, 3))
        steps = _const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        if None in (starts, ends, axes) or axes not in ([1], [-1]) or steps != [1] or not isinstance(width, int):
            continue
        slices[(starts[0], min(ends[0], width))] = node.outputs[0]
    half = width // 2 if isinstance(width, int) else None
    if half and (0, half) in slices and (half, width) in slices:
        return slices[(0, half)], slices[(half, width)]
    return None


def _repeated_rows(value: ir.Value, k: int) -> ir.Value | None:
    """X when `value` is each row of X repeated k times in place (repeat_interleave): Unsqueeze(X, 1) →
    Expand/Tile to (N, k, H) → Reshape/Flatten to (N·k, H)."""
    flat = producer(value, ("Reshape", "Flatten"))
    rep = producer(flat.inputs[0], ("Expand", "Tile")) if flat is not None else None
    unsq = producer(rep.inputs[0], "Unsqueeze") if rep is not None else None
    if unsq is None or _const_ints(unsq.inputs[1]) not in ([1], [-2]) or rank(unsq.inputs[0]) != 2:
        return None
    times = _const_ints(rep.inputs[1])  # Expand's target (N, k, H) or Tile's repeats (1, k, 1), when constant
    if times is not None and (len(times) != 3 or times[1] != k):
        return None
    return unsq.inputs[0]


def _reads(logits: ir.Value, x: ir.Value) -> bool:
    """Whether the router computes its logits from X (or a Reshape of it, or X from a Reshape of the same)."""
    router = producer(logits, ("MatMul", "Gemm"))
    if router is None:
        return False

    def roots(v: ir.Value) -> list[ir.Value]:
        out = [v]
        while (r := producer(out[-1], "Reshape")) is not None and len(out) < 4:
            out.append(r.inputs[0])
        return out

    return bool({id(v) for v in roots(router.inputs[0])} & {id(v) for v in roots(x)})


def _routing_weights(topk: ir.Node) -> tuple[ir.Value, bool]:
    """The weights the pair outputs are scaled by: TopK values, or values / ReduceSum(values) (renormalised)."""
    values = topk.outputs[0]
    for use in values.uses():
        div = use.node
        if div.op_type == "Div" and div.inputs[0] is values:
            total = producer(div.inputs[1], "ReduceSum")
            if total is not None and total.inputs[0] is values:
                return div.outputs[0], True
    return values, False


def _weighted_sum(pair_out: ir.Value, weights: ir.Value, k: int) -> ir.Value | None:
    """ReduceSum(Reshape(pair_out · weights.reshape(-1)[:, None], (N, k, H)), axis 1), as its output."""
    for use in pair_out.uses():
        mul = use.node
        if mul.op_type != "Mul":
            continue
        scale = mul.inputs[1 - use.idx]
        unsq = producer(scale, "Unsqueeze")
        flat = producer(unsq.inputs[0], ("Reshape", "Flatten")) if unsq is not None else None
        if flat is None or flat.inputs[0] is not weights:
            continue
        users = [u.node for u in mul.outputs[0].uses()]
        reshape = users[0] if len(users) == 1 and users[0].op_type == "Reshape" else None
        if reshape is None or rank(reshape.outputs[0]) != 3:
            continue
        sums = [u.node for u in reshape.outputs[0].uses()]
        total = sums[0] if len(sums) == 1 and sums[0].op_type == "ReduceSum" else None
        if total is None:
            continue
        axes = _const_ints(total.inputs[1]) if len(total.inputs) > 1 else ints(total, "axes")
        if axes in ([1], [-2]) and total.attributes.get_int("keepdims", 1) == 0 and \
                reshape.outputs[0].shape is not None and reshape.outputs[0].shape[1] == k:
            return total.outputs[0]
    return None


def _const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return [int(x) for x in tensor.numpy().reshape(-1)] if tensor is not None else None


def _attr(name: str, value) -> ir.Attr:
    if isinstance(value, str):
        return ir.AttrString(name, value)
    if isinstance(value, int):
        return ir.AttrInt64(name, value)
    return ir.AttrTensor(name, value)
