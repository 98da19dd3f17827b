"""Mixture-of-Experts blocks: where they are, how their experts are stored, how they route.

Structure says where a block is (a router with `[E, H]` weights beside E experts). What it computes
(activation, gate/up order, softmax before or after top-k, renormalisation, a shared expert) is decided
by testing each candidate against the block's own outputs, so user-written blocks need no naming
convention. Everything learned is a small JSON-able plan that rebuilds the fused block (save/load).
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.moe.reference import activation_fn
from ..kernels.moe.space import ACTIVATIONS as OP_ACTIVATIONS

# The activations the fused op implements, as the kernels define them.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {name: activation_fn(name) for name in OP_ACTIVATIONS}
SCORINGS = ("softmax_topk", "topk_softmax", "sigmoid_topk")
TOP_K_NAMES = ("top_k", "num_experts_per_tok", "topk", "k", "num_selected")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_GATE_NAMES = ("shared_expert_gate", "shared_gate")
GATE_NAMES = ("gate_proj", "w1", "gate", "wi_0", "fc_gate")
UP_NAMES = ("up_proj", "w3", "up", "wi_1", "fc1", "c_fc", "dense_h_to_4h")


def activation_name(fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """Which known activation `fn` computes, found by evaluating it (works for modules and functions)."""
    x = torch.linspace(-6.0, 6.0, 241)
    try:
        with torch.no_grad():
            y = fn(x)
    except Exception:
        return None
    for name, ref in ACTIVATIONS.items():
        if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y, ref(x), atol=1e-5, rtol=1e-5):
            return name
    return None


def route(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights (fp32) and expert ids for each token."""
    if scoring == "topk_softmax":
        values, ids = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(values.float(), dim=-1), ids
    probs = torch.softmax(logits.float(), dim=-1) if scoring == "softmax_topk" else torch.sigmoid(logits.float())
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


# ---------------------------------------------------------------- structure


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def find_experts(block: nn.Module) -> tuple[str, str] | None:
    """(child name, layout) of the experts: 'packed' (HF v5 3-D params) or 'module_list'."""
    for name, child in _children(block).items():
        params = dict(child.named_parameters(recurse=False))
        if "down_proj" in params and params["down_proj"].ndim == 3 and (
            "gate_up_proj" in params or "up_proj" in params
        ):
            return name, "packed"
        if isinstance(child, nn.ModuleList) and len(child) >= 2 and _expert_linears(child[0]) is not None:
            first = [tuple(p.shape) for p in child[0].parameters()]
            if all([tuple(p.shape) for p in e.parameters()] == first for e in child):
                return name, "module_list"
    return None


def _expert_linears(expert: nn.Module) -> tuple[list[tuple[str, nn.Linear]], tuple[str, nn.Linear]] | None:
    """(in-projections H->I, out-projection I->H) of a plain MLP expert."""
    linears = [(n, m) for n, m in expert.named_children() if isinstance(m, nn.Linear)]
    outs = [(n, m) for n, m in linears if any(m.in_features == o.out_features and m.out_features == o.in_features
                                              for _, o in linears if o is not m)]
    if len(linears) not in (2, 3) or not outs:
        return None
    hidden = linears[0][1].in_features if linears[0][1] is not outs[-1][1] else linears[0][1].out_features
    ins = [(n, m) for n, m in linears if m.in_features == hidden]
    out = [(n, m) for n, m in linears if m.out_features == hidden and m.in_features != hidden]
    if len(out) != 1 or len(ins) != len(linears) - 1:
        return None
    return ins, out[0]


def find_router(block: nn.Module, num_experts: int, hidden: int, experts_name: str) -> str | None:
    found = [
        name for name, child in _children(block).items()
        if name != experts_name and isinstance(getattr(child, "weight", None), torch.Tensor)
        and tuple(child.weight.shape) == (num_experts, hidden)
    ]
    return found[0] if len(found) == 1 else None


def find_named(block: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(block, n, None), nn.Module)), None)


# ---------------------------------------------------------------- expert weights


def packed_weights(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, bool] | str:
    """(w13, w2, gated) shared with HF v5 packed experts, or the reason they cannot be used as they are."""
    for flag, why in (("has_bias", "experts have biases"), ("is_transposed", "transposed expert weights"),
                      ("has_post_expert_norm", "a norm after each expert")):
        if getattr(experts, flag, False):
            return f"{why} are not supported yet"
    if getattr(experts, "is_concatenated", True) is False:
        return "interleaved gate/up weights are not supported yet"
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and getattr(apply_gate, "__name__", "") != "_default_apply_gate":
        return f"custom gating {type(experts).__name__}._apply_gate"
    gated = hasattr(experts, "gate_up_proj")
    w13 = experts.gate_up_proj if gated else experts.up_proj
    return w13, experts.down_proj, gated


def stacked_weights(experts: nn.ModuleList, gate_first: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Stack plain MLP experts into packed [E, 2I|I, H] and [E, H, I] tensors (a copy)."""
    w13, w2 = [], []
    for expert in experts:
        ins, (_, out) = _expert_linears(expert)
        mats = [m.weight for _, m in ins]
        if len(mats) == 2 and not gate_first:
            mats.reverse()
        w13.append(torch.cat(mats, dim=0))
        w2.append(out.weight)
    return torch.stack(w13).detach(), torch.stack(w2).detach(), len(ins) == 2


def expert_semantics(expert: nn.Module) -> list[dict[str, Any]]:
    """The (activation, gate order) candidates an MLP expert could compute, most likely first."""
    ins, _ = _expert_linears(expert)
    if any(m.bias is not None for _, m in ins) or _expert_linears(expert)[1][1].bias is not None:
        return []
    acts = [a for a in (activation_name(m) for m in expert.children() if not isinstance(m, nn.Linear)) if a]
    for attr in ("act_fn", "activation", "act", "activation_fn"):
        fn = getattr(expert, attr, None)
        if callable(fn) and not isinstance(fn, nn.Linear):
            name = activation_name(fn)
            acts += [name] if name else []
    acts = list(dict.fromkeys(acts)) or list(ACTIVATIONS)
    if len(ins) == 1:
        return [{"activation": a, "gate_first": True} for a in acts]
    names = [n for n, _ in ins]
    likely_first = names[0] in GATE_NAMES or names[1] in UP_NAMES
    orders = [likely_first, not likely_first]
    return [{"activation": a, "gate_first": o} for o, a in itertools.product(orders, acts)]


def mlp_plans(expert: nn.Module, hidden: int) -> list[dict[str, Any]]:
    """The (activation, gate order) plans our packed formula reproduces `expert` with ([] when it
    is not a plain MLP)."""
    if _expert_linears(expert) is None:
        return []
    return [p for p in expert_semantics(expert) if expert_matches(expert, p["activation"], p["gate_first"], hidden)]


def expert_matches(expert: nn.Module, activation: str, gate_first: bool, hidden: int) -> bool:
    """Does our packed formula reproduce this expert on random inputs?"""
    ins, (_, out) = _expert_linears(expert)
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(1)).to(out.weight)
    with torch.no_grad():
        want = expert(x)
        act = ACTIVATIONS[activation]
        if len(ins) == 1:
            h = act(F.linear(x, ins[0][1].weight))
        else:
            g, u = (ins[0][1], ins[1][1]) if gate_first else (ins[1][1], ins[0][1])
            h = act(F.linear(x, g.weight)) * F.linear(x, u.weight)
        got = F.linear(h, out.weight)
    return isinstance(want, torch.Tensor) and want.shape == got.shape and torch.allclose(want, got, rtol=1e-3, atol=1e-5)


def routing_candidates(block: nn.Module, num_experts: int) -> list[dict[str, Any]]:
    """Routing variants to try for a block that routes inline in its forward."""
    named = [getattr(block, n) for n in TOP_K_NAMES if isinstance(getattr(block, n, None), int)]
    ks = named[:1] or list(range(1, min(num_experts, 8) + 1))
    norm = getattr(block, "norm_topk_prob", None)
    renorms = [norm] if isinstance(norm, bool) else [True, False]
    out = []
    for k, scoring, renorm in itertools.product(ks, SCORINGS, renorms):
        if scoring == "topk_softmax" and not renorm:
            continue  # already normalised: one candidate is enough
        out.append({"top_k": k, "scoring": scoring, "renormalize": renorm})
    return out
