"""MoE fusion (exact): each Mixture-of-Experts block becomes one `adaptc::fused_moe` call.

A module-level rewrite, done before capture: the experts' data-dependent Python loop cannot be
exported, the fused op can (it has a fake implementation). Routers that return (logits, weights, ids)
- Hugging Face v5 - are kept and called as they are, so every routing variant stays exact by
construction; routers that only give logits are matched to a routing variant by testing.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import kernels  # noqa: F401  (registers adaptc::fused_moe)
from ..analysis import moe
from ..kernels._registry import kernel_preference
from ..verify import compare
from ._base import CompileContext, Decline, ModuleEdit, Pass, Plan, Site
from ._config import PassConfig


@dataclass(frozen=True)
class MoEFusionConfig(PassConfig):
    """moe_fusion has no options: which routing and expert variant a block uses is found by testing."""


@dataclass
class MoEFusionPlan(Plan):
    """The routing / expert variant that reproduced the block (FusedMoE's plan, saved as it is)."""

    spec: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.spec)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEFusionPlan":
        if not isinstance(data, dict):
            raise ValueError(f"a moe_fusion plan is a JSON object, not {type(data).__name__}")
        return cls(dict(data))


class FusedMoE(nn.Module):
    """A drop-in for an MoE block: router, one fused experts op, optional gated shared expert."""

    def __init__(self, block: nn.Module, plan: dict[str, Any]):
        super().__init__()
        self.plan = dict(plan)
        self.router = getattr(block, plan["router"])
        experts = getattr(block, plan["experts"])
        if plan["layout"] == "packed":
            w13, w2, self.gated = moe.packed_weights(experts)  # the original Parameters: shared, not copied
        else:
            w13, w2, self.gated = moe.stacked_weights(experts, plan["gate_first"])
            w13, w2 = nn.Parameter(w13, requires_grad=False), nn.Parameter(w2, requires_grad=False)
        self.w13, self.w2 = w13, w2
        self.activation = plan["activation"]
        self.shared_expert = getattr(block, plan["shared_expert"]) if plan.get("shared_expert") else None
        self.shared_expert_gate = getattr(block, plan["shared_expert_gate"]) if plan.get("shared_expert_gate") else None
        self.shared_w13 = self.shared_w2 = None
        if self.shared_expert is not None and plan.get("shared_fused"):
            # A plain-MLP shared expert is a one-expert MoE that every token picks, weighted by its
            # sigmoid gate: the same op, so its GEMMs get the same kernels and tuning (HF runs them as
            # nn.Linear: 3x slower at 16 tokens on 2 cores). Its weights are stacked (a copy).
            w13, w2, self.shared_gated = moe.stacked_weights([self.shared_expert], plan["shared_fused"]["gate_first"])
            self.shared_w13, self.shared_w2 = nn.Parameter(w13, requires_grad=False), nn.Parameter(w2, requires_grad=False)
            self.shared_activation = plan["shared_fused"]["activation"]
            self.shared_expert = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if self.plan["routing"] is None:
            _, weights, ids = self.router(x)
        else:
            weights, ids = moe.route(self.router(x), **self.plan["routing"])
        out = torch.ops.adaptc.fused_moe(x, weights, ids, self.w13, self.w2, self.activation, self.gated)
        if self.shared_w13 is not None:
            gate = torch.sigmoid(self.shared_expert_gate(x)) if self.shared_expert_gate is not None else x.new_ones(x.shape[0], 1)
            out = out + torch.ops.adaptc.fused_moe(x, gate, x.new_zeros(x.shape[0], 1, dtype=torch.long),
                                                   self.shared_w13, self.shared_w2, self.shared_activation, self.shared_gated)
        elif self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out.reshape(shape)

    def extra_repr(self) -> str:
        e, _, h = self.w13.shape
        return f"experts={e}, hidden={h}, activation={self.activation}, gated={self.gated}, routing={self.plan['routing'] or 'model'}"


class MoEFusion(Pass):
    name = "moe_fusion"
    exact = True
    config_class = MoEFusionConfig
    plan_class = MoEFusionPlan

    def match(self, ctx: CompileContext) -> list[Site]:
        sites: list[Site] = []
        for path, module in ctx.working.named_modules():
            if isinstance(module, FusedMoE) or any(s.path == "" or path.startswith(s.path + ".") for s in sites):
                continue
            found = moe.find_experts(module)
            if found is None:
                continue
            experts_name, layout = found
            experts = getattr(module, experts_name)
            if layout == "packed":
                num_experts, hidden = experts.down_proj.shape[:2]
            else:
                num_experts, hidden = len(experts), moe._expert_linears(experts[0])[1][1].out_features
            router = moe.find_router(module, num_experts, hidden, experts_name)
            if router is not None:
                sites.append(Site(path, module, {"experts": experts_name, "layout": layout, "router": router,
                                                 "num_experts": num_experts, "hidden": hidden}))
        return sites

    def no_sites_reason(self) -> str:
        return "no Mixture-of-Experts blocks (a router beside packed or ModuleList experts)"

    def check(self, ctx: CompileContext, site: Site) -> MoEFusionPlan | Decline | str:
        call = ctx.recorded_call(site.path)
        if call is None:
            return "the block did not run on the example inputs"
        args, kwargs = call
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].shape[-1] != site.info["hidden"]:
            return "the block takes more than one hidden-states tensor"
        x = args[0]
        with torch.no_grad():
            want = site.module(x)
        if not isinstance(want, torch.Tensor) or want.shape != x.shape:
            return f"the block returns {type(want).__name__}, not one tensor shaped like its input"
        plans, why = self._candidate_plans(site, x)
        if not plans:
            return why
        other_size = [n + 3 if d < x.ndim - 1 else n for d, n in enumerate(x.shape)]  # same rank, more tokens
        fresh = torch.randn(other_size, generator=torch.Generator().manual_seed(7))
        fresh = (fresh * x.float().std() + x.float().mean()).to(x)
        with torch.no_grad():
            want_fresh = site.module(fresh)
        for plan in plans:
            fused = FusedMoE(site.module, plan)
            with torch.no_grad(), kernel_preference("reference"):
                if compare(want, fused(x)).ok and compare(want_fresh, fused(fresh)).ok:
                    return MoEFusionPlan(plan)
        return "no supported routing/expert variant reproduces the block's output"

    def _candidate_plans(self, site: Site, x: torch.Tensor) -> tuple[list[dict[str, Any]], str]:
        block, info = site.module, site.info
        base = {k: info[k] for k in ("experts", "layout", "router")}
        experts = getattr(block, info["experts"])
        if info["layout"] == "packed":
            packed = moe.packed_weights(experts)
            if isinstance(packed, str):
                return [], packed
            act = moe.activation_name(experts.act_fn)
            if act is None:
                return [], f"unsupported expert activation {type(experts.act_fn).__name__}"
            expert_plans = [{"activation": act, "gate_first": True}]
        else:
            expert_plans = moe.mlp_plans(experts[0], info["hidden"])
            if not expert_plans:
                return [], "experts are not plain (gated) MLPs with a supported activation and no bias"
        with torch.no_grad():
            routed = getattr(block, info["router"])(x.reshape(-1, x.shape[-1]))
        if isinstance(routed, tuple) and len(routed) == 3 and not routed[2].is_floating_point():
            routings: list[Any] = [None]  # the model's own router gives weights and ids
        elif isinstance(routed, torch.Tensor) and routed.shape[-1] == info["num_experts"]:
            routings = moe.routing_candidates(block, info["num_experts"])
        else:
            return [], f"router {info['router']!r} returns neither logits nor (logits, weights, ids)"
        shared = moe.find_named(block, moe.SHARED_EXPERT_NAMES)
        shared_gate = moe.find_named(block, moe.SHARED_GATE_NAMES) if shared else None
        shared_fused = next(iter(moe.mlp_plans(getattr(block, shared), info["hidden"])), None) if shared else None
        gate = getattr(block, shared_gate) if shared_gate else None
        if gate is not None and not (isinstance(gate, nn.Linear) and gate.out_features == 1):
            shared_fused = None  # the op weighs each token by one scalar: a Linear to one output
        plans = [
            {**base, **e, "routing": r, "shared_expert": shared, "shared_expert_gate": shared_gate,
             "shared_fused": shared_fused}
            for e, r in itertools.product(expert_plans, routings)
        ]
        return plans, ""

    def apply(self, ctx: CompileContext, site: Site, plan: MoEFusionPlan, edit: ModuleEdit) -> None:
        edit.replace(site.path, FusedMoE(site.module, plan.spec))

    def rebuild(self, block: nn.Module, plan: MoEFusionPlan, model: nn.Module) -> nn.Module:
        """The fused block for a saved plan (adaptc.load)."""
        return FusedMoE(block, plan.spec)
