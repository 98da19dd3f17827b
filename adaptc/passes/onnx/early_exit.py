"""early_exit for ONNX: exits between a model's layers as nested `If` nodes, calibrated on user data.

    report = insert_exits(model, original_session, rows, quality=0.99)   # mutates `model` when applied

1. Layout. The layers are found from the graph alone: a *cut* is a [batch, seq, hidden] state that is the
   only hidden-sized tensor flowing from the nodes it depends on to the rest (side tensors such as the
   attention mask may flow too: `If` branches read outer values). Cuts with the same number of MatMuls
   behind them are one point (the last is kept); the cut before each stretch holding attention is a
   layer's input, and the last cut is the final state, which the model's *tail* (pooler, classifier,
   mean pooling...) turns into the outputs.
2. Heads. The exit after layer k maps its state onto the final state with an affine map fitted in closed
   form (ridge regression over the calibration rows' real tokens); a copy of the model's own tail reads
   it, so an exit produces every output the model has.
3. Thresholds. A probe model evaluates every exit at once on the rest of the rows; confidence (softmax
   max / top-1-top-2 margin of class outputs, saturation of the mean state) and agreement with the
   original (same class; cosine for embeddings) go through the torch pass's Learn-then-Test choice.
4. Emit. Exit j becomes `If(min over the batch of confidence >= threshold)`: then the exit's outputs,
   else the next layers and the next exit. The batch leaves together (ONNX control flow takes one
   condition), so the guarantee is per row at batch 1; larger batches leave only when every row is
   confident, which the runtime check measures too.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from ..early_exit import DEFAULT_DELTA, DEFAULT_QUALITY, choose_exits, cost_fractions  # shared with the torch pass
from ._rule import Decline, const, rank, scalar

ATTENTION_OPS = {"Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention"}
WEIGHT_OPS = {"MatMul", "Gemm"}
CLASS_OUTPUT_MAX = 64          # a [batch, C] output with C up to this is class scores; wider is an embedding
FIT_FRACTION, VALIDATE, RIDGES = 0.4, 4, (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
MEASURES = {"class": ("softmax_max", "margin", "saturation"), "cosine": ("saturation",)}
BATCH = 16


@dataclass
class Layout:
    boundaries: list[ir.Value]     # b_0 (entering layer 1) .. b_{L-1}, then b_L: the last layer's output
    segments: list[list[ir.Node]]  # nodes computing b_k after b_{k-1} (segments[0]: everything b_0 needs)
    tail: list[ir.Node]            # nodes that read b_L, in order
    side: list[ir.Node]            # the rest (outputs that do not read the layers), kept in the outer graph
    outputs: list[ir.Value]        # graph outputs the tail (or b_L itself) makes
    primary: ir.Value              # the output agreement is measured on
    agreement: str                 # class | cosine
    mask: ir.Value | None          # [batch, seq] input marking real tokens
    readout: int | str             # what the tail reads of b_L: a token index ([CLS]) or "tokens" (all real ones)
    layer_weights: float           # weight elements per token of one layer (mean)
    tail_weights: int

    @property
    def num_layers(self) -> int:
        return len(self.boundaries) - 1


def find_layout(model: ir.Model) -> Layout:
    graph = model.graph
    nodes = list(graph)
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in nodes for a in n.attributes.values()):
        raise Decline("the model already has control flow (If/Loop/Scan)")
    index = {id(n): i for i, n in enumerate(nodes)}
    by_id = {id(n): n for n in nodes}
    hidden = _hidden_size(nodes)
    if hidden is None:
        raise Decline("no [batch, seq, hidden] states: not a layer stack adaptc can find")

    def ancestors(value: ir.Value) -> set[int]:
        seen, stack = set(), [value.producer()]
        while stack:
            n = stack.pop()
            if n is None or id(n) in seen:
                continue
            seen.add(id(n))
            stack.extend(v.producer() for v in n.inputs if v is not None)
        return seen

    def is_state(v: ir.Value) -> bool:
        return (v.dtype is not None and v.dtype.is_floating_point() and rank(v) == 3
                and v.shape[2] == hidden)

    cuts = []
    for n in nodes:
        for v in n.outputs:
            if not is_state(v):
                continue
            anc = ancestors(v)
            crossing = [o for a in nodes if id(a) in anc for o in a.outputs
                        if o is not v and (o.is_graph_output() or
                                           (is_state(o) and any(id(u.node) not in anc for u in o.uses())))]
            if not crossing:
                matmuls = sum(1 for a in nodes if id(a) in anc and a.op_type in WEIGHT_OPS)
                cuts.append((matmuls, len(anc), v, anc))
    last_of_count: dict[int, tuple] = {}
    for c in sorted(cuts, key=lambda c: c[1]):
        last_of_count[c[0]] = c
    points = sorted(last_of_count.values(), key=lambda c: c[1])
    boundaries, anc_of = [], {}
    for prev, cur in zip(points, points[1:]):
        if any(by_id[i].op_type in ATTENTION_OPS for i in cur[3] - prev[3]):
            boundaries.append(prev[2])
        anc_of[id(prev[2])], anc_of[id(cur[2])] = prev[3], cur[3]
    if len(boundaries) < 2:
        raise Decline(f"found {len(boundaries)} attention layer(s) between single-state cuts; exits need at least two")
    final = points[-1]
    boundaries.append(final[2])
    if final[2] in boundaries[:-1]:
        raise Decline("the last layer's output is not separable from its attention")

    reads_final = _descendants(final[2])
    tail = [n for n in nodes if id(n) in reads_final]
    body = final[3]
    side = [n for n in nodes if id(n) not in body and id(n) not in reads_final]
    first = anc_of[id(boundaries[1])]
    outer = first | {id(n) for n in side}
    for n in side:
        if any(v is not None and v.producer() is not None and id(v.producer()) not in outer for v in n.inputs):
            raise Decline(f"{n.name or n.op_type} reads an inner layer's state outside the layer stack")
    segments, done = [], set()
    for b in boundaries[1:]:
        anc = anc_of[id(b)]
        segments.append([nodes[i] for i in _ordered(anc - done, index)])
        done = anc
    outputs = [v for v in graph.outputs if v is final[2] or (v.producer() is not None and id(v.producer()) in reads_final)]
    for v in graph.outputs:
        if v not in outputs and v.producer() is not None and id(v.producer()) in body and id(v.producer()) not in first:
            raise Decline(f"output {v.name!r} is an inner layer's state")
    primary, agreement = _primary_output(outputs, hidden)
    mask = next((v for v in graph.inputs if "mask" in (v.name or "").lower() and rank(v) == 2), None)
    layers = [_weights(seg, graph) for seg in segments[1:]]  # segments[0] also holds the embeddings
    return Layout(boundaries, segments, tail, side, outputs, primary, agreement, mask, _readout(final[2]),
                  float(np.mean(layers)) if layers else 0.0, _weights(tail, graph))


def _readout(final: ir.Value) -> int | str:
    """The part of the final state the heads must get right: the one token every use gathers (a [CLS]
    pooler), else every real token (pooled outputs average them; an affine head commutes with that)."""
    index = set()
    for use in final.uses():
        node = use.node
        i = scalar(node.inputs[1]) if node.op_type == "Gather" and use.idx == 0 else None
        if i is None or node.attributes.get_int("axis", 0) != 1:
            index = set()
            break
        index.add(int(i))
    if len(index) == 1:
        return index.pop()
    return "tokens"


def _hidden_size(nodes: list[ir.Node]) -> int | None:
    """The most common static last dim of the rank-3 float tensors: the residual stream's width."""
    widths = [v.shape[2] for n in nodes for v in n.outputs
              if v.dtype is not None and v.dtype.is_floating_point() and rank(v) == 3 and isinstance(v.shape[2], int)]
    return max(set(widths), key=widths.count) if widths else None


def _ordered(ids: set[int], index: dict[int, int]) -> list[int]:
    return sorted(index[i] for i in ids)


def _descendants(value: ir.Value) -> set[int]:
    seen, stack = set(), [u.node for u in value.uses()]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.extend(u.node for o in n.outputs for u in o.uses())
    return seen


def _weights(nodes: list[ir.Node], graph: ir.Graph) -> int:
    """Weight elements the segment multiplies each token by (MatMul/Gemm operands that are initializers)."""
    total = 0
    for n in nodes:
        if n.op_type in WEIGHT_OPS:
            for v in n.inputs[:2]:
                if v is not None and v.const_value is not None:
                    total += int(np.prod(v.const_value.shape.numpy()))
    return total


def _primary_output(outputs: list[ir.Value], hidden: int) -> tuple[ir.Value, str]:
    floats = [v for v in outputs if v.dtype is not None and v.dtype.is_floating_point()]
    rows = [v for v in floats if rank(v) == 2]
    if rows:
        v = rows[0]
        width = v.shape[1]
        return v, "class" if isinstance(width, int) and width <= CLASS_OUTPUT_MAX else "cosine"
    tokens = [v for v in floats if rank(v) == 3]
    if tokens and tokens[0].shape[2] == hidden:
        return tokens[0], "cosine"
    if tokens:
        raise Decline(f"output {tokens[0].name!r} is per-token scores (a language model?): per-token exits need "
                      "K/V propagation and per-row control flow, which ONNX If cannot express")
    raise Decline("no floating-point output to measure agreement on")


# -- building exits ------------------------------------------------------------------------------------

class Builder:
    """Appends exit nodes (heads, tail copies, confidences) with names no other value in the model has."""

    def __init__(self, model: ir.Model, layout: Layout) -> None:
        self.model, self.layout = model, layout
        self.opset = model.opset_imports.get("", 17)
        self._ids = itertools.count()
        self._means: dict[int, ir.Value] = {}
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs: list[ir.Value | None], outputs: int = 1, **attrs: Any) -> Any:
        n = next(self._ids)
        node = ir.Node("", op_type, inputs, [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()],
                       outputs=[ir.Value(name=f"adaptc_exit_{n}_{i}") for i in range(outputs)], name=f"adaptc_exit_{n}")
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else list(node.outputs)

    def const(self, array: np.ndarray, name: str = "adaptc_exit_const") -> ir.Value:
        return const(self.model.graph, name, np.asarray(array))

    def reduce(self, op_type: str, x: ir.Value, axes: list[int], keepdims: int = 0) -> ir.Value:
        axes_are_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_are_input:
            return self.op(op_type, [x, self.const(np.array(axes, np.int64), "adaptc_exit_axes")], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)

    def mean_state(self, state: ir.Value) -> ir.Value:
        """[batch, hidden]: the state averaged over real tokens (all tokens without a mask input)."""
        if id(state) not in self._means:
            mask = self.layout.mask
            if mask is None:
                self._means[id(state)] = self.reduce("ReduceMean", state, [1])
            else:
                m = self.op("Unsqueeze", [self.op("Cast", [mask], to=state.dtype), self.const(np.array([-1], np.int64))])
                total = self.reduce("ReduceSum", self.op("Mul", [state, m]), [1])
                count = self.op("Max", [self.reduce("ReduceSum", m, [1]), self.const(np.ones(1, _np(state)))])
                self._means[id(state)] = self.op("Div", [total, count])
        return self._means[id(state)]

    def cosine(self, a: ir.Value, b: ir.Value, dtype: np.dtype) -> ir.Value:
        dot = self.reduce("ReduceSum", self.op("Mul", [a, b]), [-1])
        norms = self.op("Mul", [self.op("Sqrt", [self.reduce("ReduceSum", self.op("Mul", [a, a]), [-1])]),
                                self.op("Sqrt", [self.reduce("ReduceSum", self.op("Mul", [b, b]), [-1])])])
        cos = self.op("Div", [dot, self.op("Max", [norms, self.const(np.array([1e-12], dtype))])])
        return self.op("Clip", [cos, self.const(np.array(0, dtype)), self.const(np.array(1, dtype))])

    def exit(self, j: int, previous: ir.Value, state: ir.Value, weight: np.ndarray, bias: np.ndarray,
             measures: tuple[str, ...]) -> tuple[list[ir.Value], dict[str, ir.Value]]:
        """Exit j reading `state` (leaving its layer): the tail's outputs and a [batch] confidence per measure."""
        dtype = _np(state)
        head = self.op("Add", [self.op("MatMul", [state, self.const(weight.astype(dtype), f"adaptc_exit{j}_weight")]),
                               self.const(bias.astype(dtype), f"adaptc_exit{j}_bias")])
        copies = {id(self.layout.boundaries[-1]): head}
        for n in self.layout.tail:
            attrs = [ir.Attr(a.name, a.type, a.value) for a in n.attributes.values()]
            clone = ir.Node(n.domain, n.op_type, [copies.get(id(v), v) if v is not None else None for v in n.inputs],
                            attrs, outputs=[ir.Value(name=f"{o.name}__exit{j}", shape=o.shape, type=o.type) for o in n.outputs],
                            name=f"{n.name}__exit{j}", version=n.version)
            self.nodes.append(clone)
            copies.update({id(o): c for o, c in zip(n.outputs, clone.outputs)})
        outputs = [copies[id(v)] for v in self.layout.outputs]
        primary = copies[id(self.layout.primary)]
        confidence = {}
        if "saturation" in measures:
            confidence["saturation"] = self.cosine(self.mean_state(previous), self.mean_state(state), dtype)
        if {"softmax_max", "margin"} & set(measures):
            probs = self.op("Softmax", [primary], axis=-1)
            top = self.op("TopK", [probs, self.const(np.array([2], np.int64))], outputs=2, axis=-1)[0]
            first = self.op("Gather", [top, self.const(np.array(0, np.int64))], axis=1)
            confidence["softmax_max"] = first
            confidence["margin"] = self.op("Sub", [first, self.op("Gather", [top, self.const(np.array(1, np.int64))], axis=1)])
        return outputs, {m: confidence[m] for m in measures}


def _np(value: ir.Value) -> np.dtype:
    return np.dtype(value.dtype.numpy())


# -- the pass ------------------------------------------------------------------------------------------

def insert_exits(model: ir.Model, original, rows: dict[str, np.ndarray], quality: float | None = None,
                 delta: float = DEFAULT_DELTA, seed: int = 0, progress: bool | None = None) -> dict[str, Any]:
    """Fit, calibrate and (when some exit meets `quality`) insert exits into `model` in place.
    `original`: an onnxruntime session of the unmodified model (the teacher); `rows`: calibration
    arrays named after the inputs, one row per sample; `progress`: adaptc.progress's rule. Returns the
    report; "status" says what happened."""
    quality = DEFAULT_QUALITY if quality is None else float(quality)
    report: dict[str, Any] = {"name": "early_exit", "quality": quality, "delta": delta}
    try:
        layout = find_layout(model)
    except Decline as why:
        return {**report, "status": "skipped", "reason": str(why)}
    n = _num_rows(rows)
    L = layout.num_layers
    perm = np.random.default_rng(seed).permutation(n)
    fit, held = np.sort(perm[: int(n * FIT_FRACTION)]), np.sort(perm[int(n * FIT_FRACTION):])
    kind = "classifier" if layout.agreement == "class" else "embedding"
    report.update({"kind": kind, "num_layers": L, "rows": n, "fit_rows": len(fit), "calibration_rows": len(held),
                   "primary_output": layout.primary.name, "agreement": layout.agreement,
                   "mask_input": layout.mask.name if layout.mask is not None else None,
                   "exit_head": "affine map onto the final state (ridge regression) + a copy of the model's own tail",
                   "head_fitted_on": f"token {layout.readout}" if isinstance(layout.readout, int) else layout.readout,
                   "batching": "a batch leaves at an exit when its least confident row does (one If condition); "
                               "the guarantee is per row, i.e. exact at batch 1"})
    heads, report["head_ridge"] = fit_heads(model, layout, _take(rows, fit), progress=progress)
    measures = MEASURES[layout.agreement] if _width(layout.primary) != 1 else ("saturation",)
    confidence, agreement = probe(model, heads, measures, original, _take(rows, held), progress)
    exits = list(range(L - 1))  # exit e leaves after layer e (0-based), reading boundary e + 1
    seq = next((v.shape[1] for v in rows.values() if v.ndim > 1), 1)
    hidden = layout.boundaries[0].shape[2]
    cost = cost_fractions(exits, layout.layer_weights * seq, (hidden * hidden + layout.tail_weights) * seq, L)
    A = torch.as_tensor(agreement, dtype=torch.float64)
    trials = [(m, exits, torch.as_tensor(confidence[m], dtype=torch.float64), A, cost) for m in measures]
    report["per_exit_agreement"] = [round(float(a), 4) for a in agreement.mean(0)]
    report["cost_model"] = "weight multiply-adds per token (layers vs head + tail)"
    chosen = choose_exits(trials, quality, delta, report)
    if isinstance(chosen, str):
        return {**report, "status": "skipped", "reason": chosen}
    emit(model, layout, chosen.exit_layers, chosen.thresholds, chosen.measure, heads)
    return {**report, "status": "applied", "reason": ""}


def _num_rows(rows: dict[str, np.ndarray]) -> int:
    return next((len(v) for v in rows.values() if v.ndim), 1)  # a scalar input (rank 0) goes with every row


def _take(rows: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] if v.ndim else v for k, v in rows.items()}


def _batches(rows: dict[str, np.ndarray], size: int = BATCH, step: tuple[str, str] = ("", ""),
             progress: bool | None = False):
    """Row batches, counted by an adaptc.progress step: `step` is (while it runs, once it is done)."""
    from ...progress import Steps

    n = _num_rows(rows)
    with Steps(step[0], n, progress) as steps:
        for i in range(0, n, size):
            yield {k: v[i:i + size] if v.ndim else v for k, v in rows.items()}
            steps.advance(min(size, n - i))
        steps.done = f"{step[1]} on {n} rows"


def _width(value: ir.Value) -> int | None:
    d = value.shape[-1] if value.shape is not None else None
    return d if isinstance(d, int) else None


def _session(model: ir.Model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _copy(model: ir.Model) -> tuple[ir.Model, Layout]:
    clone = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    return clone, find_layout(clone)


def _valid_tokens(mask: ir.Value | str | None, feed: dict[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """[batch, seq] bool: the real tokens (the mask input's nonzeros; every token without one)."""
    name = mask.name if isinstance(mask, ir.Value) else mask
    return feed[name].astype(bool) if name in feed else np.ones(shape[:2], dtype=bool)


def fit_heads(model: ir.Model, layout: Layout, rows: dict[str, np.ndarray],
              ridges: tuple[float, ...] = RIDGES, progress: bool | None = False) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[float]]:
    """Per exit, (W, b) with b_k W + b ~ b_L on what the tail reads (the [CLS] token or every real token):
    ridge regression of the residual b_L - b_k, so it shrinks towards "the state is already final". The
    ridge strength is chosen per exit on every VALIDATE-th batch, then the head is refitted on all rows."""
    clone, states = _copy(model)
    names = _expose(clone, states.boundaries)
    session = _session(clone)
    hidden = layout.boundaries[0].shape[2]
    E = layout.num_layers - 1
    gram = np.zeros((2, E, hidden + 1, hidden + 1))  # [fit, validate]
    cross = np.zeros((2, E, hidden + 1, hidden))
    for i, feed in enumerate(_batches(rows, step=("fitting exit heads", "fitted exit heads"), progress=progress)):
        out = session.run(names, _feed(session, feed))
        read = _reader(layout.readout, _valid_tokens(layout.mask, feed, out[0].shape))
        part, target = int(i % VALIDATE == VALIDATE - 1), read(out[-1])
        for e in range(E):
            x = read(out[e + 1])
            x1 = np.concatenate([x, np.ones((len(x), 1))], 1)
            gram[part, e] += x1.T @ x1
            cross[part, e] += x1.T @ (target - x)

    def solve(g: np.ndarray, c: np.ndarray, ridge: float) -> np.ndarray:
        return np.linalg.solve(g + ridge * g.diagonal().mean() * np.eye(len(g)), c)

    heads, chosen = [], []
    for e in range(E):
        def validation_error(ridge: float) -> float:  # squared error on the held-out batches, up to a constant
            w = solve(gram[0, e], cross[0, e], ridge)
            return float(np.sum(w * (gram[1, e] @ w)) - 2 * np.sum(w * cross[1, e]))
        ridge = min(ridges, key=validation_error) if gram[1, e, -1, -1] > 0 else ridges[len(ridges) // 2]
        w = solve(gram[0, e] + gram[1, e], cross[0, e] + cross[1, e], ridge)
        heads.append((np.eye(hidden) + w[:-1], w[-1]))
        chosen.append(ridge)
    return heads, chosen


def _reader(readout: int | str, valid: np.ndarray):
    """[batch, seq, hidden] -> the rows the heads are fitted on (float64)."""
    if isinstance(readout, int):
        return lambda h: h[:, readout].astype(np.float64)
    return lambda h: h[valid].astype(np.float64)


def probe(model: ir.Model, heads, measures: tuple[str, ...], original, rows: dict[str, np.ndarray],
          progress: bool | None = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every exit evaluated on every row: confidence per measure [n, E] and agreement with the original [n, E]."""
    clone, layout = _copy(model)
    b = layout.boundaries
    builder = Builder(clone, layout)
    exit_outputs = [builder.exit(k, b[k - 1], b[k], *heads[k - 1], measures) for k in range(1, layout.num_layers)]
    clone.graph.extend(builder.nodes)
    names = _expose(clone, [o[0][layout.outputs.index(layout.primary)] for o in exit_outputs] +
                    [o[1][m] for o in exit_outputs for m in measures])
    session = _session(clone)
    E = len(exit_outputs)
    conf = {m: [] for m in measures}
    agree = []
    teacher_output = layout.primary.name
    for feed in _batches(rows, step=("calibrating exits", "calibrated exits"), progress=progress):
        want = original.run([teacher_output], _feed(original, feed))[0]
        out = session.run(names, _feed(session, feed))
        valid = _valid_tokens(layout.mask, feed, want.shape)
        agree.append(np.stack([_agreement(layout.agreement, out[e], want, valid) for e in range(E)], 1))
        for i, m in enumerate(measures):
            conf[m].append(np.stack([out[E + e * len(measures) + i] for e in range(E)], 1))
    return {m: np.concatenate(v) for m, v in conf.items()}, np.concatenate(agree)


def runtime_agreement(original, converted, rows: dict[str, np.ndarray], report: dict[str, Any],
                      batches: tuple[int, ...] = (1, BATCH)) -> dict[str, float]:
    """Mean agreement of the converted model (exits taken as onnxruntime takes them) with the original,
    per batch size ({"batch1": ...}); the original runs once."""
    name = report["primary_output"]
    want = np.concatenate([original.run([name], _feed(original, feed))[0] for feed in _batches(rows)])
    valid = _valid_tokens(report.get("mask_input"), rows, want.shape)
    result = {}
    for batch in batches:
        got = np.concatenate([converted.run([name], _feed(converted, feed))[0] for feed in _batches(rows, batch)])
        result[f"batch{batch}"] = round(float(_agreement(report["agreement"], got, want, valid).mean()), 5)
    return result


def _agreement(kind: str, got: np.ndarray, want: np.ndarray, valid: np.ndarray) -> np.ndarray:
    if kind == "class":
        return (got.argmax(-1) == want.argmax(-1)).astype(np.float64)
    if got.ndim == 3:  # token states: compare the mean over real tokens
        w = valid[..., None].astype(np.float64)
        got, want = (got * w).sum(1) / w.sum(1).clip(1), (want * w).sum(1) / w.sum(1).clip(1)
    got, want = got.astype(np.float64), want.astype(np.float64)
    cos = (got * want).sum(-1) / np.maximum(np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1), 1e-12)
    return cos.clip(0.0, 1.0)


def _expose(model: ir.Model, values: list[ir.Value]) -> list[str]:
    """Make `values` graph outputs (a probe); returns their names."""
    for v in values:
        if not v.is_graph_output():
            model.graph.outputs.append(v)
    return [v.name for v in values]


def _feed(session, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: feed[i.name] for i in session.get_inputs()}


def emit(model: ir.Model, layout: Layout, exit_layers: list[int], thresholds: list[float], measure: str,
         heads: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Nest the layers after each taken exit into the `else` branch of that exit's If."""
    graph, b, segments = model.graph, layout.boundaries, layout.segments
    taken = [(e + 1, t) for e, t in zip(exit_layers, thresholds) if not math.isinf(t)]  # (boundary, threshold)
    keep = {id(n) for n in layout.side} | {id(n) for seg in segments[: taken[0][0]] for n in seg}
    graph.remove([n for n in graph if id(n) not in keep])
    builder = Builder(model, layout)
    exits = []
    for k, threshold in taken:
        builder.nodes = []
        outputs, confidence = builder.exit(k, b[k - 1], b[k], *heads[k - 1], (measure,))
        lowest = builder.reduce("ReduceMin", confidence[measure], [0])
        leave = builder.op("GreaterOrEqual", [lowest, builder.const(np.array(threshold, _np(b[k])))])
        exits.append((builder.nodes, outputs, leave))

    def layers(start: int, stop: int | None) -> list[ir.Node]:
        return [n for seg in segments[start:stop] for n in seg]

    names = [v.name for v in layout.outputs]
    for v in layout.outputs:
        v.name = f"{v.name}__full"
    bounds = [k for k, _ in taken]
    otherwise = _branch(layers(bounds[-1], None) + layout.tail, layout.outputs, "full")
    for j in reversed(range(len(taken))):
        nodes, outputs, leave = exits[j]
        results = [ir.Value(name=name if j == 0 else f"{name}__after_exit{j}", type=v.type, shape=v.shape)
                   for name, v in zip(names, layout.outputs)]
        node = ir.Node("", "If", [leave], [ir.AttrGraph("then_branch", _branch([], outputs, f"exit{j}")),
                                           ir.AttrGraph("else_branch", otherwise)], outputs=results, name=f"adaptc_exit{j}_if")
        if j:
            otherwise = _branch(layers(bounds[j - 1], bounds[j]) + nodes + [node], results, f"after_exit{j - 1}")
            continue
        graph.extend(nodes + [node])
        replaced = {id(v): r for v, r in zip(layout.outputs, results)}
        new_outputs = [replaced.get(id(v), v) for v in graph.outputs]
        graph.outputs.clear()
        graph.outputs.extend(new_outputs)


def _branch(nodes: list[ir.Node], outputs: list[ir.Value], name: str) -> ir.Graph:
    """A subgraph computing `outputs` (through Identity nodes, so every output is made inside it)."""
    ids = [ir.Node("", "Identity", [v], outputs=[ir.Value(name=f"{v.name}__{name}_out", type=v.type, shape=v.shape)])
           for v in outputs]
    return ir.Graph([], [n.outputs[0] for n in ids], nodes=list(nodes) + ids, name=name)
