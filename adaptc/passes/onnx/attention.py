"""Attention fusion: MatMul(Q, K^T)·scale (+ mask) → Softmax → MatMul(·, V) becomes one attention op.

Anchored on Softmax and walked backwards, so one rule covers what both torch exporters write:
- scale as Div/Mul of the scores (TorchScript, eager attention) or as sqrt(scale) on Q and on K^T
  (dynamo's scaled_dot_product_attention);
- K^T as Transpose(K, [0,1,3,2]), as Transpose(K_bshd, [0,2,3,1]), or as Reshape/Transpose/Reshape;
- an additive mask (padding, causal, both) and dynamo's NaN guard Where(IsNaN(P), 0, P);
- GQA: K/V repeated by Unsqueeze/Expand/Reshape (repeat_kv).

Targets:
- `standard`: ONNX `Attention` (opset 23) on 4-D Q/K/V; GQA by K/V head count (repeat_kv is removed);
  onnxruntime's CPU kernel gives 0 on rows whose every key is masked, as the NaN guard does.
- `onnxruntime`: com.microsoft `MultiHeadAttention` (3-D Q, K/V 3-D or BNSH, attention_bias); its CPU
  kernel gives NaN on fully masked rows, so a NaN guard in the original is kept on its output. It needs a
  static head count: where rotary embeddings sit between the head split and the scores (TorchScript writes
  the count as -1), it is read from the split behind them; GQA's repeat_kv is then kept (equal heads).
Both need the mask's query dimension spelled out, so a (B,1,1,T) padding mask is expanded once per model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ._rule import Decline, OnnxRule, const, dim, ints, only_user, producer, rank, replace_output, scalar

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class AttentionSite:
    pv: ir.Node                 # MatMul(P, V): its output is what the fused op replaces
    q4: ir.Value                # (B, H, S, D)
    k4: ir.Value | None         # (B, Hkv, T, D) when the graph has it
    k_bshd: ir.Value | None     # (B, T, Hkv, D) when K^T was Transpose(., [0,2,3,1])
    v4: ir.Value                # (B, Hkv, T, D)
    mask: ir.Value | None       # additive, rank 4
    scale: float
    nan_guard: bool
    heads: int | None = None      # static, for MultiHeadAttention
    head_size: int | None = None


class AttentionFusion(OnnxRule):
    name = "attention_fusion"
    anchor = "Softmax"
    needs_opset = 23  # for the standard target: ONNX Attention

    def prepare(self, model: ir.Model) -> None:
        self.opset = model.opset_imports.get("", 0)
        self.full_masks: dict[int, ir.Value] = {}  # one expanded mask per model, shared by all layers

    # -- match ------------------------------------------------------------------------------------
    def match(self, softmax: ir.Node) -> AttentionSite | None:
        probs, nan_guard = softmax.outputs[0], False
        pv = only_user(probs, "MatMul")
        if pv is None:
            guarded = _nan_guard_output(probs)
            if guarded is None:
                return None  # not attention (a router, a classifier head)
            probs, nan_guard = guarded, True
            pv = only_user(probs, "MatMul")
        if pv is None or pv.inputs[0] is not probs:
            return None
        axis = softmax.attributes.get_int("axis", -1)
        if self.opset < 13 or axis not in (-1, 3):
            raise Decline(f"Softmax over axis {axis} at opset {self.opset}: not attention over keys")
        v4 = pv.inputs[1]
        if rank(v4) != 4:
            raise Decline(f"V has rank {rank(v4)}, expected 4 (B, H, T, D)")

        scores, mask = softmax.inputs[0], None
        add = producer(scores, "Add")
        if add is not None:
            for i in (0, 1):
                if _peel_scale(add.inputs[i])[0] is not None:
                    scores, mask = add.inputs[i], add.inputs[1 - i]
                    break
            else:
                raise Decline("the Softmax input adds two tensors, neither of them Q·K^T")
        qk, scale = _peel_scale(scores)
        if qk is None:
            raise Decline("no Q·K^T MatMul before the Softmax")
        q4, q_scale = _peel_scalar_mul(qk.inputs[0])
        kt, k_scale = _peel_scalar_mul(qk.inputs[1])
        k4, k_bshd = _k_from_kt(kt)
        if rank(q4) != 4:
            raise Decline(f"Q has rank {rank(q4)}, expected 4 (B, H, S, D)")
        if mask is not None and (rank(mask) != 4 or mask.dtype not in FLOAT_TYPES):
            raise Decline(f"mask of rank {rank(mask)} and type {mask.dtype}: expected a rank-4 additive float mask")
        if q4.dtype not in FLOAT_TYPES:
            raise Decline(f"Q of type {q4.dtype}: attention ops take floats")
        site = AttentionSite(pv, q4, k4, k_bshd, v4, mask, scale * q_scale * k_scale, nan_guard)
        if self.target == "onnxruntime":
            self._check_mha(site)
        return site

    def _check_mha(self, site: AttentionSite) -> None:
        heads, head_size = _heads(site.q4, bhsd=True)
        if heads is None:  # rotary embeddings between the head split and the scores hide the split
            heads, head_size = _heads_behind_rope(site.q4)
        if heads is None or head_size is None:
            raise Decline("MultiHeadAttention needs a static head count and head size; shapes are unknown")
        kv_heads = _heads(site.k4, bhsd=True)[0] if site.k4 is not None else _heads(site.k_bshd, bhsd=False)[0]
        v_heads = _heads(site.v4, bhsd=True)[0]
        if kv_heads is None and v_heads is None and site.k4 is not None:
            kv_heads = v_heads = _repeated_heads(site.k4, site.v4, heads)
        if kv_heads != heads or v_heads != heads:
            raise Decline(f"K/V have {kv_heads}/{v_heads} heads for {heads} query heads; "
                          "MultiHeadAttention needs equal heads")
        site.heads, site.head_size = heads, head_size
        if site.q4.dtype != ir.DataType.FLOAT:
            raise Decline(f"onnxruntime's CPU MultiHeadAttention takes float32, not {site.q4.dtype}")

    # -- rewrite ----------------------------------------------------------------------------------
    def rewrite(self, graph: ir.Graph, softmax: ir.Node, site: AttentionSite) -> None:
        new: list[ir.Node] = []
        mask = self._full_mask(graph, site, new) if site.mask is not None else None
        if self.target == "onnxruntime":
            out = self._multi_head_attention(graph, site, mask, new)
        else:
            k4, v4 = _k4(site, new), site.v4
            base_k, base_v = _peel_repeat_kv(k4), _peel_repeat_kv(v4)
            if base_k is not None and base_v is not None:
                k4, v4 = base_k, base_v  # the op repeats K/V heads itself (GQA)
            node = ir.Node("", "Attention", [site.q4, k4, v4] + ([mask] if mask is not None else []),
                           {"scale": ir.AttrFloat32("scale", site.scale)}, name=_name(site.pv, "Attention"))
            new.append(node)
            out = (site.pv.outputs[0], node.outputs[0])
        graph.insert_before(site.pv, new)
        replace_output(graph, *out)

    def _multi_head_attention(self, graph, site: AttentionSite, mask, new):
        heads, head_size = site.heads, site.head_size
        q3 = _bsh_source(site.q4) or _to_bsh(graph, site.q4, new)
        k3 = _reshape_source(site.k_bshd) if site.k_bshd is not None else None
        v3 = _bsh_source(site.v4)
        k, v = (k3, v3) if k3 is not None and v3 is not None else (_k4(site, new), site.v4)  # both 3-D or both BNSH
        node = ir.Node("com.microsoft", "MultiHeadAttention", [q3, k, v, None, None, mask],
                       {"num_heads": ir.AttrInt64("num_heads", heads), "scale": ir.AttrFloat32("scale", site.scale)},
                       name=_name(site.pv, "MultiHeadAttention"))
        new.append(node)
        out3 = node.outputs[0]
        if site.nan_guard:  # the original turns fully masked rows into 0; the kernel gives NaN there
            isnan = ir.Node("", "IsNaN", [out3])
            zero = const(graph, "adaptc_zero", np.zeros((), dtype=site.q4.dtype.numpy()))
            where = ir.Node("", "Where", [isnan.outputs[0], zero, out3])
            new += [isnan, where]
            out3 = where.outputs[0]
        merge = only_user(site.pv.outputs[0], "Transpose")
        merged = only_user(merge.outputs[0], "Reshape") if merge is not None and ints(merge, "perm") == [0, 2, 1, 3] else None
        if merged is not None and rank(merged.outputs[0]) == 3:
            return merged.outputs[0], out3  # the graph merged heads right after: hand it the 3-D output
        split = ir.Node("", "Reshape", [out3, const(graph, "adaptc_bshd", np.array([0, 0, heads, head_size], np.int64))])
        back = ir.Node("", "Transpose", [split.outputs[0]], {"perm": ir.AttrInt64s("perm", [0, 2, 1, 3])})
        new += [split, back]
        return site.pv.outputs[0], back.outputs[0]

    def _full_mask(self, graph: ir.Graph, site: AttentionSite, new: list[ir.Node]) -> ir.Value:
        """The mask with its query dimension spelled out: both ops refuse a broadcast (B,1,1,T) mask."""
        mask = site.mask
        q_len, m_len = dim(site.q4, 2), dim(mask, 2)
        if q_len is not None and q_len == m_len:
            return mask
        if id(mask) in self.full_masks:
            return self.full_masks[id(mask)]
        shape = ir.Node("", "Shape", [site.q4], {"start": ir.AttrInt64("start", 2), "end": ir.AttrInt64("end", 3)})
        one_one = const(graph, "adaptc_one_one", np.array([1, 1], np.int64))
        one = const(graph, "adaptc_one", np.array([1], np.int64))
        target = ir.Node("", "Concat", [one_one, shape.outputs[0], one], {"axis": ir.AttrInt64("axis", 0)})
        expand = ir.Node("", "Expand", [mask, target.outputs[0]], name="adaptc_full_attention_mask")
        new += [shape, target, expand]
        self.full_masks[id(mask)] = expand.outputs[0]
        return expand.outputs[0]

    def finish(self, model: ir.Model, fired: int) -> None:
        if fired and self.target == "onnxruntime":
            model.opset_imports.setdefault("com.microsoft", 1)


# -- the spellings, one helper each ---------------------------------------------------------------

def _heads(value: ir.Value | None, bhsd: bool) -> tuple[int | None, int | None]:
    """(heads, head size) of a (B,H,S,D) value (`bhsd`) or a (B,S,H,D) one: from its inferred shape, or
    from the Reshape that split the heads (TorchScript spells the shape as a Concat shape inference
    cannot see through)."""
    if value is None:
        return None, None
    h, d = dim(value, 1 if bhsd else 2), dim(value, 3)
    if isinstance(h, int) and isinstance(d, int):
        return h, d
    if bhsd:
        t = producer(value, "Transpose")
        if t is None or ints(t, "perm") != [0, 2, 1, 3]:
            return None, None
        value = t.inputs[0]
    reshape = producer(value, "Reshape")
    spec = _shape_spec(reshape.inputs[1]) if reshape is not None else None
    if spec is None or len(spec) != 4:
        return None, None
    h, d = h if isinstance(h, int) else spec[2], d if isinstance(d, int) else spec[3]
    width = dim(reshape.inputs[0], -1) if rank(reshape.inputs[0]) == 3 else None
    if h is None and isinstance(d, int) and isinstance(width, int) and width % d == 0:
        h = width // d  # TorchScript writes the head count as -1
    return h, d


def _heads_behind_rope(q4: ir.Value) -> tuple[int | None, int | None]:
    """(heads, head size) of the head split that rotary embeddings read: q·cos + rotate_half(q)·sin walks
    back through Add/Mul/Concat/Neg/Slice to one Transpose(Reshape(q3), [0,2,1,3])."""
    splits, frontier, seen = set(), [q4], 0
    while frontier and seen < 24:
        value = frontier.pop()
        seen += 1
        t = producer(value, "Transpose")
        if t is not None and ints(t, "perm") == [0, 2, 1, 3]:
            splits.add(value)
            continue
        node = producer(value, ("Add", "Mul", "Concat", "Neg", "Slice"))
        if node is not None:
            frontier += [v for v in node.inputs[:2 if node.op_type != "Concat" else None]
                         if v is not None and rank(v) == 4 and ir.convenience.get_const_tensor(v) is None]
    if len(splits) != 1:
        return None, None
    return _heads(splits.pop(), bhsd=True)


def _repeated_heads(k4: ir.Value, v4: ir.Value, heads: int) -> int | None:
    """`heads` when K and V are repeat_kv of a split whose head count divides it (GQA expanded to MHA)."""
    base_k, base_v = _peel_repeat_kv(k4), _peel_repeat_kv(v4)
    if base_k is None or base_v is None:
        return None
    kv = _heads(base_v, bhsd=True)[0]
    return heads if kv and heads % kv == 0 else None


def _shape_spec(value: ir.Value) -> list[int | None] | None:
    """A Reshape target as ints where they are constants (None where they are computed)."""
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return [int(x) if x > 0 else None for x in tensor.numpy().reshape(-1)]
    concat = producer(value, "Concat")
    if concat is None:
        return None
    spec: list[int | None] = []
    for part in concat.inputs:
        t = ir.convenience.get_const_tensor(part)
        if t is not None:
            spec += [int(x) if x > 0 else None for x in t.numpy().reshape(-1)]
        elif part.shape is not None and len(part.shape) == 1 and isinstance(part.shape[0], int):
            spec += [None] * part.shape[0]
        else:
            return None
    return spec


def _nan_guard_output(probs: ir.Value) -> ir.Value | None:
    """Where(IsNaN(P), 0, P) as dynamo's scaled_dot_product_attention writes it; its output, else None."""
    users = {u.node.op_type: u.node for u in probs.uses()}
    isnan, where = users.get("IsNaN"), users.get("Where")
    if isnan is None or where is None or len(users) != 2 or probs.is_graph_output():
        return None
    if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not probs or scalar(where.inputs[1]) != 0.0:
        return None
    return where.outputs[0]


def _peel_scale(value: ir.Value) -> tuple[ir.Node | None, float]:
    """(the Q·K^T MatMul, the scale applied to its output) or (None, 1)."""
    node = producer(value, ("Div", "Mul"))
    scale = 1.0
    if node is not None:
        if node.op_type == "Div" and (c := scalar(node.inputs[1])) not in (None, 0.0):
            value, scale = node.inputs[0], 1.0 / c
        elif node.op_type == "Mul":
            for i in (0, 1):
                if (c := scalar(node.inputs[i])) is not None:
                    value, scale = node.inputs[1 - i], c
                    break
    return producer(value, "MatMul"), scale


def _peel_scalar_mul(value: ir.Value) -> tuple[ir.Value, float]:
    node = producer(value, "Mul")
    if node is not None:
        for i in (0, 1):
            if (c := scalar(node.inputs[i])) is not None:
                return node.inputs[1 - i], c
    return value, 1.0


def _k_from_kt(kt: ir.Value) -> tuple[ir.Value | None, ir.Value | None]:
    """K as (B,H,T,D) or as (B,T,H,D), from the K^T that feeds the scores MatMul."""
    t = producer(kt, "Transpose")
    if t is not None and ints(t, "perm") == [0, 1, 3, 2]:
        return t.inputs[0], None
    if t is not None and ints(t, "perm") == [0, 2, 3, 1]:
        return None, t.inputs[0]
    outer = producer(kt, "Reshape")  # dynamo: Reshape(Transpose(Reshape(K, [B*H, T, D]), [0,2,1]), [B,H,D,T])
    mid = producer(outer.inputs[0], "Transpose") if outer is not None else None
    inner = producer(mid.inputs[0], "Reshape") if mid is not None and ints(mid, "perm") == [0, 2, 1] else None
    if inner is not None and rank(inner.inputs[0]) == 4 and rank(kt) == 4:
        return inner.inputs[0], None
    raise Decline("cannot see which K the K^T operand transposes")


def _k4(site: AttentionSite, new: list[ir.Node]) -> ir.Value:
    if site.k4 is not None:
        return site.k4
    t = ir.Node("", "Transpose", [site.k_bshd], {"perm": ir.AttrInt64s("perm", [0, 2, 1, 3])})
    new.append(t)
    site.k4 = t.outputs[0]
    return site.k4


def _peel_repeat_kv(value: ir.Value) -> ir.Value | None:
    """X for Reshape(Expand(Unsqueeze(X, [2]), [B,Hkv,n,T,D]), [B,Hkv*n,T,D]), else None."""
    reshape = producer(value, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsq = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsq is None or rank(unsq.inputs[0]) != 4:
        return None
    axes = ir.convenience.get_const_tensor(unsq.inputs[1]) if len(unsq.inputs) > 1 else None
    return unsq.inputs[0] if axes is not None and axes.numpy().tolist() in ([2], [-3]) else None


def _reshape_source(value: ir.Value | None) -> ir.Value | None:
    """The 3-D (B, T, H*D) tensor a (B, T, H, D) value was reshaped from, if it was."""
    reshape = producer(value, "Reshape")
    return reshape.inputs[0] if reshape is not None and rank(reshape.inputs[0]) == 3 else None


def _bsh_source(value: ir.Value) -> ir.Value | None:
    """The 3-D tensor behind Transpose(Reshape(x3, [B,S,H,D]), [0,2,1,3]), if that is how `value` was made."""
    t = producer(value, "Transpose")
    return _reshape_source(t.inputs[0]) if t is not None and ints(t, "perm") == [0, 2, 1, 3] else None


def _to_bsh(graph: ir.Graph, q4: ir.Value, new: list[ir.Node]) -> ir.Value:
    t = ir.Node("", "Transpose", [q4], {"perm": ir.AttrInt64s("perm", [0, 2, 1, 3])})
    r = ir.Node("", "Reshape", [t.outputs[0], const(graph, "adaptc_bs_flat", np.array([0, 0, -1], np.int64))])
    new += [t, r]
    return r.outputs[0]


def _name(anchor: ir.Node, op: str) -> str:
    return f"{anchor.name or 'attention'}/adaptc_{op}"
