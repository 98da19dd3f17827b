"""Eager attention fusion (exact): hand-written softmax(q k^T * scale, masked) v runs on `adaptc::attention`.

For attention written out with matmul / mask / softmax / matmul (nanoGPT, older model code, user
modules) rather than through SDPA or Hugging Face's interface. The innermost modules that call softmax
on the example inputs are exported (torch.export, dynamic batch and sequence); in the ATen graph, each
softmax over the last dim is matched back through an optional masked_fill (with -inf or a large
negative), an optional scalar scale (on the scores or on q) to matmul(q, k^T), and forward to its one
matmul with v. The chain becomes one call that takes the mask's structure (causal, window, padding)
like SDPA fusion does. The module is replaced by the rewritten graph, with the original kept for calls
outside the graph's shape ranges. Declines say which part of the chain did not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import kernels  # noqa: F401  (registers adaptc::attention)
from ..analysis.calls import innermost_callers
from ..capture.inputs import Inputs
from ..capture.torch_capture import capture
from ..errors import CaptureError
from ..runtime.module import CompiledModule
from ._base import CompileContext, Decline, ModuleEdit, Pass, Plan, Site
from ._config import PassConfig
from .sdpa_fusion import adaptc_sdpa

aten = torch.ops.aten
SOFTMAX_FUNCS = {torch.softmax, F.softmax, torch.Tensor.softmax, torch.special.softmax}
MATMUL_FUNCS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.einsum}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default}
SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
MASK_FILL_AT_MOST = -1e4  # a fill this negative makes exp() exactly 0 next to any real score


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """What the matched chain computes; `hidden` is masked_fill's mask (True = not attended)."""
    return adaptc_sdpa(q, k, v, attn_mask=None if hidden is None else ~hidden, scale=scale)


@dataclass
class Chain:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    hidden: fx.Node | None
    scale: float
    out: fx.Node  # the matmul with v, which the fused call replaces


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _scalar(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def _peel_scale(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(input, factor) when `node` multiplies or divides by a Python number."""
    if node.op != "call_function" or node.target not in SCALE_OPS:
        return None
    x, s = node.args[0], _scalar(node.args[1])
    if s is None or not isinstance(x, fx.Node):
        return None
    return x, (s if node.target in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / s)


def match_chain(softmax: fx.Node) -> Chain | str:
    """The attention chain around this softmax node, or why it is not one."""
    val = _val(softmax)
    dim = softmax.args[1]
    if val is None or dim not in (-1, val.dim() - 1):
        return "softmax is not over the last dim (keys)"
    x, scale, hidden = softmax.args[0], 1.0, None
    for _ in range(2):  # the mask and the scale, in either order
        if not isinstance(x, fx.Node) or not _single_user(x):
            return "the scores are used elsewhere (attention weights returned or stored?)"
        if x.target is aten.masked_fill.Scalar and hidden is None:
            fill = _scalar(x.args[2])
            if fill is None or fill > MASK_FILL_AT_MOST:
                return f"masked_fill with {x.args[2]!r}, not -inf or a large negative"
            hidden, x = x.args[1], x.args[0]
        elif (peeled := _peel_scale(x)) is not None and scale == 1.0:
            x, scale = peeled[0], peeled[1]
        elif x.target is aten.add.Tensor:
            return "an additive float mask (its values may be a bias, not a 0/-inf mask)"
    if not (isinstance(x, fx.Node) and x.target is aten.matmul.default and _single_user(x)):
        return "the scores are not matmul(q, k^T)"
    q, kt = x.args
    if not (isinstance(kt, fx.Node) and kt.target is aten.transpose.int and sorted(
            d % _val(kt).dim() for d in kt.args[1:]) == [_val(kt).dim() - 2, _val(kt).dim() - 1]):
        return "the keys are not transposed in the last two dims"
    k = kt.args[0]
    if (peeled := _peel_scale(q)) is not None and _single_user(q):  # scale applied to q instead
        q, scale = peeled[0], scale * peeled[1]
    p = softmax
    users = list(p.users)
    if len(users) == 1 and users[0].target is aten.dropout.default and not users[0].args[2]:
        p, users = users[0], list(users[0].users)  # dropout in eval mode is the identity
    if len(users) != 1 or users[0].target is not aten.matmul.default or users[0].args[0] is not p:
        return "the probabilities do not feed one matmul with v"
    v = users[0].args[1]
    shapes = [_val(n) for n in (q, k, v)]
    if any(s is None or s.dim() != 4 for s in shapes):
        return "q, k, v are not [batch, heads, tokens, dim]"
    if shapes[1].shape != shapes[2].shape or shapes[0].shape[1] != shapes[1].shape[1] or shapes[0].shape[-1] != shapes[1].shape[-1]:
        return "k and v differ in shape or heads/dims do not line up with q"
    if hidden is not None and (_val(hidden) is None or _val(hidden).dtype != torch.bool):
        return "the mask is not boolean"
    return Chain(q, k, v, hidden, scale, users[0])


def fuse_graph(gm: fx.GraphModule) -> tuple[int, list[str]]:
    """Rewrite every attention chain in `gm`; (chains fused, reasons for the softmaxes left alone)."""
    fused, reasons = 0, []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SOFTMAX_OPS:
            continue
        chain = match_chain(node)
        if isinstance(chain, str):
            reasons.append(chain)
            continue
        with gm.graph.inserting_before(chain.out):
            call = gm.graph.call_function(eager_attention, (chain.q, chain.k, chain.v, chain.hidden, chain.scale))
        call.meta["val"] = chain.out.meta.get("val")
        chain.out.replace_all_uses_with(call)
        fused += 1
    if fused:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return fused, reasons


@dataclass(frozen=True)
class EagerAttentionFusionConfig(PassConfig):
    """eager_attention_fusion has no options: a chain is fused only where it matches exactly."""


@dataclass
class EagerAttentionFusionPlan(Plan):
    """The site's module exported with its attention chains fused (`chains` of them)."""

    module: CompiledModule
    chains: int


class EagerAttentionFusion(Pass):
    name = "eager_attention_fusion"
    exact = True
    config_class = EagerAttentionFusionConfig
    plan_class = EagerAttentionFusionPlan
    # The rewrite is an exported graph held in memory: a whole-graph capture saves it, a block-granularity
    # save could not rebuild it from data.
    saveable = False

    def match(self, ctx: CompileContext) -> list[Site]:
        calls = innermost_callers(ctx.working, lambda: ctx.working(*ctx.inputs.args, **ctx.inputs.kwargs),
                                  lambda func: func in SOFTMAX_FUNCS or func in MATMUL_FUNCS,
                                  lambda func, *a, **k: func in SOFTMAX_FUNCS)
        sites = {}
        for path, is_softmax in calls.items():
            module = ctx.working.get_submodule(path)
            if isinstance(module, nn.Softmax) and path:  # the chain lives in the module holding the Softmax
                path = path.rpartition(".")[0]
                is_softmax = is_softmax + calls.get(path, [])
                module = ctx.working.get_submodule(path)
            # a softmax and the two matmuls around it, or nothing worth exporting the module for
            if not any(is_softmax) or is_softmax.count(False) < 2:
                continue
            if path and not isinstance(module, CompiledModule):
                sites[path] = Site(path, module)
        return list(sites.values())

    def no_sites_reason(self) -> str:
        return "no module below the root calls softmax between two matmuls"

    def check(self, ctx: CompileContext, site: Site) -> EagerAttentionFusionPlan | Decline | str:
        call = ctx.recorded_call(site.path)
        if call is None:
            return "not called on the example inputs"
        inputs = Inputs(*call)
        try:
            captured = capture(site.module, inputs, ("export",))
        except CaptureError as exc:
            return f"does not export: {exc}"
        fused, reasons = fuse_graph(captured.module)
        if not fused:
            return reasons[0] if reasons else "no softmax in its exported graph"
        signature = CompiledModule.signature_of(inputs.args, inputs.kwargs, captured.shapes)
        return EagerAttentionFusionPlan(CompiledModule(captured.module, signature, eager=site.module), fused)

    def apply(self, ctx: CompileContext, site: Site, plan: EagerAttentionFusionPlan, edit: ModuleEdit) -> None:
        edit.replace(site.path, plan.module)
