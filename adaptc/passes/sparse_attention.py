"""Sparse attention (approximate, calibrated): each head reads only the key blocks its pattern picks.

Patterns — attention sinks + a local window + the top-k key blocks scored from pooled queries/keys
(`adaptc::sparse_attention`) — are chosen per head from how much attention mass each candidate keeps
on the calibration text; one global threshold `tau` on that kept mass is then searched so that the
model's next-token agreement with the original on calibration text meets `quality`. The measured
agreement, perplexities and density go in the report. Hugging Face causal LMs only (through the
attention interface); calls the patterns cannot serve (padding, sliding windows, short sequences) run
exact `adaptc::attention`, and so do calls where the pattern would read most blocks anyway (short
sequences), where exact attention is both faster and more accurate than what was certified.
"""
from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import kernels  # noqa: F401  (registers the adaptc ops)
from ..calibrate import attention_sparsity as cal
from ._base import CompileContext, Decline, Knob, ModuleEdit, Pass, Plan, Site
from ._config import PassConfig
from .attention_fusion import (SUPPORTED_FROM, adaptc_attention_forward, interface_sites, mask_structure,
                               no_sdpa_reason, register_attention)

IMPLEMENTATION = "adaptc_sparse"
TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)  # sparsest first
DEFAULT_QUALITY = 0.99


def sparse_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, sliding_window: int | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The "adaptc_sparse" attention implementation: the module's calibrated pattern where it applies."""
    pattern: cal.HeadPattern | None = getattr(module, "adaptc_sparse_pattern", None)
    Lq, Lk = query.shape[2], key.shape[2]
    plain = attention_mask is None or attention_mask.dtype == torch.bool
    s = mask_structure(attention_mask, Lq, Lk, True, sliding_window or 0) if plain else None
    if (pattern is None or s is None or s.key_padding is not None or s.mask is not None or s.window
            or (dropout and module.training) or Lk <= pattern.block
            or (_density(pattern, Lk) > DENSE_ENOUGH and not _measuring.get())):
        return adaptc_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        is_causal=is_causal, sliding_window=sliding_window, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.adaptc.sparse_attention(query, key, value, scale, Lk - Lq, pattern.block, list(pattern.sinks),
                                            list(pattern.window), list(pattern.topk))
    return out.transpose(1, 2).contiguous(), None


# Where a pattern would read more than this share of the causal blocks, exact attention (SDPA's flash
# kernel) is faster than gathering them, and more accurate: measured 0.75x at density 0.75 on SmolLM2.
# Calibration and verification always run the patterns (what they certify is the pattern itself).
DENSE_ENOUGH = 0.6
_measuring: contextvars.ContextVar[bool] = contextvars.ContextVar("adaptc_sparse_measuring", default=False)


@functools.lru_cache(maxsize=4096)
def _density(pattern: cal.HeadPattern, length: int) -> float:
    return cal.density({"": pattern}, length)


def register() -> None:
    register_attention(IMPLEMENTATION, sparse_attention_forward)


@dataclass
class Quality:
    """The approximate pass's verification: measured on held-out calibration batches against `quality`."""

    target: float
    measured: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.measured.get("agreement", 0.0) >= self.target

    @property
    def why(self) -> str:
        return f"next-token agreement {self.measured.get('agreement', 0):.4f} < quality {self.target}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "quality", "metric": "next-token agreement", "target": self.target, **self.measured}


@dataclass(frozen=True)
class SparseAttentionConfig(PassConfig):
    """sparse_attention has no options of its own: compile's `quality` sets its target."""


@dataclass
class SparseAttentionPlan(Plan):
    """One attention module's calibrated pattern; `target` and `held_out` (the batches calibration did
    not fit on) are what verify checks it against."""

    pattern: cal.HeadPattern
    target: float = DEFAULT_QUALITY
    held_out: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return self.pattern.to_dict()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseAttentionPlan":
        if not isinstance(data, dict) or set(data) != {"block", "sinks", "window", "topk"}:
            raise ValueError("a sparse_attention plan has exactly block, sinks, window and topk")
        block, lists = data["block"], [data[k] for k in ("sinks", "window", "topk")]
        ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
        if not (isinstance(block, int) and block > 0 and all(ints(x) for x in lists) and len({len(x) for x in lists}) == 1):
            raise ValueError("a sparse_attention plan needs a positive block and one count >= 0 per head in each list")
        return cls(cal.HeadPattern(block, *(tuple(x) for x in lists)))


@dataclass
class _Calibrated:
    """The calibration every attention module's check shares (ctx.once): patterns, or why none."""

    patterns: dict[str, cal.HeadPattern] = field(default_factory=dict)
    decline: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    target: float = DEFAULT_QUALITY
    held_out: list = field(default_factory=list)


class SparseAttention(Pass):
    name = "sparse_attention"
    exact = False
    needs_calibration = True
    config_class = SparseAttentionConfig
    plan_class = SparseAttentionPlan

    def match(self, ctx: CompileContext) -> list[Site]:
        config = getattr(ctx.working, "config", None)
        if config is None or not hasattr(ctx.working, "generate"):
            return []
        if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_decoder", True):
            return []
        return interface_sites(ctx.working)

    def no_sites_reason(self) -> str:
        return "no Hugging Face causal-LM attention modules (bidirectional and encoder-decoder models are not handled)"

    def check(self, ctx: CompileContext, site: Site) -> SparseAttentionPlan | Decline | str:
        if (why := no_sdpa_reason(ctx.working)) is not None:
            return why
        impl = site.info["config"]._attn_implementation
        if impl not in (*SUPPORTED_FROM, "adaptc", IMPLEMENTATION):
            return f"the model runs {impl!r} attention"
        c: _Calibrated = ctx.once((self.name, "calibration"), lambda: self._calibrate(ctx))
        if c.decline:
            return Decline(c.decline, c.details)
        if site.path not in c.patterns:
            return Decline("no attention calls seen on the calibration text", c.details)
        return SparseAttentionPlan(c.patterns[site.path], c.target, c.held_out, details=c.details)

    def apply(self, ctx: CompileContext, site: Site, plan: SparseAttentionPlan, edit: ModuleEdit) -> None:
        config = site.info["config"]
        if config._attn_implementation != IMPLEMENTATION:
            register()
            edit.set_attr(config, "_attn_implementation", IMPLEMENTATION)
        edit.set_attr(site.module, "adaptc_sparse_pattern", plan.pattern)

    def rebuild(self, attention: nn.Module, plan: SparseAttentionPlan, model: nn.Module) -> nn.Module:
        """For adaptc.load: the saved pattern on the rebuilt module, its config switched to the patterns."""
        register()
        attention.config._attn_implementation = IMPLEMENTATION
        attention.adaptc_sparse_pattern = plan.pattern
        return attention

    def verify(self, ctx: CompileContext, plans: dict[str, SparseAttentionPlan]) -> Quality:
        first = next(iter(plans.values()))  # every site shares one calibration: its target and held-out data
        token = _measuring.set(True)
        try:
            measured = cal.next_token_quality(ctx.working, self._reference(ctx, first.held_out), first.held_out)
        finally:
            _measuring.reset(token)
        first.details["held_out"] = measured
        return Quality(first.target, measured)

    # -- joint quality budget (adaptc/budget.py) -------------------------------------------------
    def knob(self, ctx: CompileContext, sites: list[Site]) -> Knob | Decline | str:
        """Kept mass measured on the fitting rows; the ladder is exact attention, then tau from densest to
        sparsest. Its cost model: attention's share of a block's multiply-adds at the calibration length,
        scaled by the patterns' density where the runtime runs them (exact above DENSE_ENOUGH)."""
        if (why := no_sdpa_reason(ctx.working)) is not None:
            return why
        impl = sites[0].info["config"]._attn_implementation
        if impl not in (*SUPPORTED_FROM, "adaptc", IMPLEMENTATION):
            return f"the model runs {impl!r} attention"
        batches = list(ctx.calibration or [])
        recovered = cal.recovered_mass(ctx.original, batches) if batches else {}
        if not recovered:
            return "the calibration batches are not longer than one block: nothing to make sparse"
        length = int(cal._input_ids(batches[0]).shape[1])
        config = ctx.working.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention = length * config.num_attention_heads * head_dim  # q.k and p.v per token, causal average
        block = ctx.working.get_submodule(sites[0].path.rpartition(".")[0])
        weights = sum(p.numel() for p in block.parameters() if p.dim() >= 2)
        share = attention / (attention + weights)
        ladder = [(None, cal.patterns_at(recovered, 2.0))]  # no head keeps 2x its mass: every head dense
        ladder += [(tau, cal.patterns_at(recovered, tau)) for tau in reversed(TAUS)]
        settings = []
        for tau, patterns in ladder:
            d = cal.density(patterns, length)
            settings.append({"tau": tau, "density": round(d, 4), "cost": round(1 - share * (1 - d) if d <= DENSE_ENOUGH else 1.0, 4),
                             "patterns": {path: p.to_dict() for path, p in patterns.items()}})
        details = {"metric": "end to end (the budget's)", "block": cal.BLOCK, "calibration_length": length,
                   "attention_share_of_block_work": round(share, 4), "dense_above_density": DENSE_ENOUGH,
                   "heads": sum(len(p.window) for p in ladder[0][1].values())}
        paths = [site.path for site in sites if site.path in recovered]

        def plans(i: int) -> dict[str, Plan]:
            return {path: SparseAttentionPlan(ladder[i][1][path], details=details) for path in paths}

        def cost_left(model: nn.Module) -> float:
            installed = {path: model.get_submodule(path).adaptc_sparse_pattern for path in paths}
            return next(float(x["cost"]) for x, (_, p) in zip(settings, ladder) if p == installed)

        for setting in settings:  # sites the calibration never reached keep no pattern
            setting["patterns"] = {path: setting["patterns"][path] for path in paths}
        return Knob(settings, plans, cost_left, details)

    def retune(self, model: nn.Module, setting: dict[str, Any], plans: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for path, data in setting["patterns"].items():
            model.get_submodule(path).adaptc_sparse_pattern = SparseAttentionPlan.from_dict(data).pattern
        return {path: dict(setting["patterns"][path]) for path in plans}

    def _reference(self, ctx: CompileContext, batches) -> list[torch.Tensor]:
        with torch.no_grad():
            return [ctx.original(*b.args, **b.kwargs).logits for b in batches]

    def _calibrate(self, ctx: CompileContext) -> _Calibrated:
        """Measure kept mass, then search tau (sparsest first, by bisection) against the quality target."""
        batches = list(ctx.calibration or [])
        if len(batches) < 2:
            return _Calibrated(decline="needs at least 2 calibration batches (one to fit the patterns, one held out "
                                       "to check them)")
        split = max(1, len(batches) // 2)
        fit, held_out = batches[:split], batches[split:]
        target = ctx.config.quality or DEFAULT_QUALITY
        recovered = cal.recovered_mass(ctx.original, fit)
        if not recovered:
            return _Calibrated(decline="the calibration batches are not longer than one block: nothing to make sparse")
        reference = self._reference(ctx, fit)
        register()
        config = ctx.working.config
        old = config._attn_implementation
        tried: dict[float, dict[str, float]] = {}

        def quality_at(tau: float) -> dict[str, float]:
            if tau not in tried:
                plan = cal.patterns_at(recovered, tau)
                for path, pattern in plan.items():
                    ctx.working.get_submodule(path).adaptc_sparse_pattern = pattern
                tried[tau] = cal.next_token_quality(ctx.working, reference, fit)
            return tried[tau]

        config._attn_implementation = IMPLEMENTATION
        token = _measuring.set(True)
        try:
            lo, hi = 0, len(TAUS) - 1  # the answer: the smallest index whose agreement meets the target
            if quality_at(TAUS[hi])["agreement"] < target:
                lo = len(TAUS)
            while lo < hi:
                mid = (lo + hi) // 2
                if quality_at(TAUS[mid])["agreement"] >= target:
                    hi = mid
                else:
                    lo = mid + 1
        finally:
            _measuring.reset(token)
            config._attn_implementation = old
            for path in recovered:
                vars(ctx.working.get_submodule(path)).pop("adaptc_sparse_pattern", None)
        search = [{"tau": t, **q} for t, q in sorted(tried.items())]
        if lo == len(TAUS):
            return _Calibrated(decline=(f"no pattern setting meets next-token agreement {target} on the calibration "
                                        f"text (densest tried: {search[-1]['agreement']:.4f})"),
                               details={"search": search})
        tau = TAUS[lo]
        patterns = cal.patterns_at(recovered, tau)
        length = int(cal._input_ids(fit[0]).shape[1])
        details = {
            "quality_target": target, "metric": "next-token agreement with the original", "tau": tau,
            "calibration": tried[tau], "search": search, "block": cal.BLOCK,
            "density_at_calibration_length": round(cal.density(patterns, length), 4),
            "calibration_length": length,
            "dense_heads": sum(p.dense_heads() for p in patterns.values()),
            "heads": sum(len(p.window) for p in patterns.values()),
        }
        return _Calibrated(patterns, None, details, target, held_out)
