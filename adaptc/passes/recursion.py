"""recursion: relaxed recursion for stacks of distinct blocks — fewer parameters, agreement certified.

N distinct blocks become K shared blocks looped N/K times (cycle or middle-cycle sharing), each position
keeping a low-rank delta on every Linear (adaptc/runtime/recursion.py). By default both are fitted to the
inputs each Linear sees on the fit rows: the shared weight is the average of its positions' weighted by those
inputs, the delta the truncated SVD of W_l - W_shared in the norm of the Linear's outputs (ASVD / SVD-LLM's
whitening; on the MiniLM-L6 classifier at K=3, rank 96 it lifts held-out agreement from 0.41 to 0.93).
Settings (K, rank) are tried in an order fixed before any data is seen: for each K one chain from the highest
rank down, tested by Learn-then-Test (Hoeffding-Bentkus p-values, fixed-sequence testing within a chain,
Bonferroni over the chains) on calibration rows nothing was fitted on. The certified setting with the fewest
parameters wins; none with a saving is a decline naming the measured frontier.

It saves memory, not time (each Linear adds two skinny matmuls): the speed check reports its ratios
but keeps it (`Pass.for_memory`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..analysis.layer_stack import LayerStack, find_layer_stack
from ..calibrate.thresholds import METHOD, hoeffding_bentkus_pvalue, min_samples
from ..errors import SaveLoadError
from ..runtime.recursion import (INITS, SHARINGS, RelaxedLinear, empty_relaxed_modules, input_covariances, install,
                                 linear_names, relaxation_basis, relaxed_modules, relaxed_of, share_groups,
                                 unique_parameters)
from ..verify import Comparison
from ._base import CompileContext, Decline, ModuleEdit, Pass, Plan, Site
from ._config import option
from .early_exit import CalibratedConfig, _is_int, _is_number, runtime_agreement

DEFAULT_QUALITY = 0.95
RANK_FRACTIONS = (4, 8, 16, 32)
DELTA_INITS = ("whitened", "svd")  # default ranks: hidden / these (hidden / 2 saves nothing on a square matrix)


@dataclass(frozen=True)
class RecursionConfig(CalibratedConfig):
    """recursion's options (compile's `quality` sets the agreement target)."""

    shared_blocks: tuple[int, ...] | None = option(None, doc="K values to try; None: every divisor of N in [2, N/2]")
    ranks: tuple[int, ...] | None = option(None, doc="delta ranks to try, highest first; None: hidden/4 ... hidden/32, 0")
    sharing: str = option("cycle", doc="cycle (position l uses block l mod K) or middle_cycle (first and last own)")
    init: str = option("weighted", doc="shared weights: weighted (the average that least changes the outputs on the "
                                       "fit rows' inputs), averaged over their positions, or stepwise (the first's)")
    delta_init: str = option("whitened", doc="svd: truncated SVD of W_l - W_shared; whitened: the same SVD in the norm "
                                             "of the outputs on the fit rows' inputs (keeps the directions inputs use)")
    distill_steps: int = option(0, doc="steps distilling the deltas from the original per setting tried (0: SVD only)")
    distill_fraction: float = option(0.4, doc="share of calibration rows that fit the deltas (whitening, distillation); the rest calibrate")
    distill_lr: float = option(1e-3, doc="distillation learning rate")

    def __post_init__(self) -> None:
        for name in ("shared_blocks", "ranks"):  # a saved file gives JSON lists: the same config as tuples
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not _is_number(self.distill_fraction) or not 0.0 < self.distill_fraction < 1.0:
            self.fail("distill_fraction", "must be a number in (0, 1)")
        for name, low in (("shared_blocks", 1), ("ranks", 0)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (tuple, list)) or not value
                                      or not all(_is_int(v) and v >= low for v in value)):
                self.fail(name, f"must be None or a non-empty sequence of integers >= {low}")
        if self.sharing not in SHARINGS:
            self.fail("sharing", f"must be one of {', '.join(SHARINGS)}")
        if self.init not in INITS:
            self.fail("init", f"must be one of {', '.join(INITS)}")
        if self.delta_init not in DELTA_INITS:
            self.fail("delta_init", f"must be one of {', '.join(DELTA_INITS)}")
        if not _is_int(self.distill_steps) or self.distill_steps < 0:
            self.fail("distill_steps", "must be an integer >= 0")
        if not _is_number(self.distill_lr) or self.distill_lr <= 0:
            self.fail("distill_lr", "must be a number > 0")


@dataclass
class RecursionPlan(Plan):
    """The relaxed stack of one model. Saved: the tie map (groups of positions sharing a block), the
    relaxed Linear names and every position's rank per name; the weights are in the state_dict."""

    kind: str
    groups: list[list[int]]
    names: list[str]
    ranks: list[list[int]]                       # ranks[position][i] for names[i]
    sharing: str = "cycle"
    init: str = "weighted"
    modules: dict[str, RelaxedLinear] | None = None  # built in check; on load made empty and filled by load_state_dict
    agreement: float | None = None                    # measured in check on the calibration rows

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "groups": self.groups, "names": self.names, "ranks": self.ranks,
                "sharing": self.sharing, "init": self.init}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecursionPlan":
        kind, groups, names, ranks = (data.get(k) for k in ("kind", "groups", "names", "ranks"))
        if kind not in ("classifier", "embedding", "causal_lm"):
            raise SaveLoadError(f"recursion plan has kind {kind!r}")
        if not (isinstance(groups, list) and groups and all(isinstance(g, list) and g and all(_is_int(p) for p in g)
                                                            for g in groups)):
            raise SaveLoadError("recursion plan's groups must be a non-empty list of non-empty lists of positions")
        positions = sorted(p for g in groups for p in g)
        if positions != list(range(len(positions))):
            raise SaveLoadError(f"recursion plan's groups must cover positions 0..N-1 once each, got {groups}")
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)):
            raise SaveLoadError("recursion plan's names must be a non-empty list of module names")
        if not (isinstance(ranks, list) and len(ranks) == len(positions)
                and all(isinstance(r, list) and len(r) == len(names) and all(_is_int(x) and x >= 0 for x in r)
                        for r in ranks)):
            raise SaveLoadError(f"recursion plan's ranks must be {len(positions)} lists of {len(names)} integers >= 0")
        sharing, init = data.get("sharing", "cycle"), data.get("init", "weighted")
        if sharing not in SHARINGS or init not in INITS:
            raise SaveLoadError(f"recursion plan's sharing {sharing!r} / init {init!r} is unknown")
        return cls(kind, groups, names, ranks, sharing, init)


class Recursion(Pass):
    name = "recursion"
    exact = False
    needs_calibration = True
    # Blocks stay modules: the saved file then stores each shared weight once (torch.save keeps the ties)
    # and load rebuilds the tie map from the plan.
    keeps_blocks = True
    for_memory = True
    config_class = RecursionConfig
    plan_class = RecursionPlan

    def no_sites_reason(self) -> str:
        return "no BERT-like encoder / classifier or causal-LM layer stack"

    def match(self, ctx: CompileContext) -> list[Site]:
        s = find_layer_stack(ctx.working)
        return [Site(s.layers_path, s.layers, {"stack": s})] if s is not None and len(s.layers) >= 2 else []

    # -- check: try the settings, certify, pick the smallest -----------------------------------------
    def check(self, ctx: CompileContext, site: Site) -> RecursionPlan | Decline:
        c = self.config
        quality = ctx.config.quality or DEFAULT_QUALITY
        delta = float(c.delta)
        s: LayerStack = site.info["stack"]
        N = len(s.layers)
        details: dict[str, Any] = {"kind": s.kind, "quality": quality, "delta": delta, "num_layers": N,
                                   "sharing": c.sharing, "init": c.init}
        names = linear_names(s.layers)
        if isinstance(names, str):
            return Decline(f"the blocks cannot share weights: {names}", details)
        details["relaxed_linears"] = names
        chains = self._shared_block_counts(N)
        if not chains:
            return Decline(f"no shared-block count fits {N} blocks with {c.sharing} sharing", details)
        ranks = sorted(set(c.ranks if c.ranks is not None else (*(max(1, s.hidden // f) for f in RANK_FRACTIONS), 0)),
                       reverse=True)
        fit, cal = self._split(ctx, self.config.batches(ctx))
        if self._fits(c) and not fit:
            return Decline("one calibration row: the deltas need rows to fit on and others to calibrate on "
                           "(give more calibration data, or init='averaged', delta_init='svd', distill_steps=0)", details)
        n = _rows(cal, s.kind)
        before, before_bytes = unique_parameters(s.layers)
        model_before, _ = unique_parameters(ctx.working)
        details.update({"shared_block_counts": chains, "ranks": ranks, "delta_init": c.delta_init,
                        "distill_steps": c.distill_steps, "calibration_rows": n,
                        "fit_rows": _rows(fit, s.kind) if fit else 0, "parameters_before": before,
                        "bytes_before": before_bytes, "model_parameters_before": model_before,
                        "samples": "rows" if s.kind != "causal_lm" else
                        "tokens; tokens of one passage are not independent, so the guarantee treats them as i.i.d."})
        covariances = None
        if c.delta_init == "whitened" or c.init == "weighted":  # the teacher's inputs to every Linear, on rows that never calibrate
            covariances = input_covariances(ctx.original, find_layer_stack(ctx.original).layers, names, fit)
        share = delta / len(chains)  # Bonferroni over the chains; fixed-sequence testing within each
        alpha = 1.0 - quality
        tried, best = [], None
        for K in chains:
            groups = share_groups(N, K, c.sharing)
            basis = relaxation_basis(s.layers, groups, names, c.init, max_rank=ranks[0], covariances=covariances)
            chain_open = True
            for r in ranks:
                modules = relaxed_modules(s.layers, basis, r)
                row = {"shared_blocks": K, "rank": r}
                row.update(self._count(ctx, s, modules, before, model_before))
                if row["parameters"] >= before:
                    tried.append({**row, "tested": False, "note": "no parameter saving"})
                    continue
                if not chain_open and c.distill_steps:  # a broken chain certifies nothing more: skip its distillation
                    tried.append({**row, "tested": False, "note": "after the chain's first failure"})
                    continue
                agreement, distilled = self._measure(ctx, s, modules, fit, cal)
                risk = 1.0 - agreement
                p = hoeffding_bentkus_pvalue(risk, n, alpha)
                certified = chain_open and p <= share
                chain_open = certified
                row.update({"tested": True, "agreement": round(agreement, 5), "p_value": float(f"{p:.4g}"),
                            "certified": certified, **({"distillation": distilled} if distilled else {})})
                tried.append(row)
                if certified and (best is None or row["parameters"] < best[0]["parameters"]):
                    best = (row, groups, modules, agreement)
        details["settings"] = tried
        details["procedure"] = (f"{METHOD}: per shared-block count a chain of ranks, highest first, each setting's "
                                f"null 'agreement < {quality}' tested at delta/{len(chains)} (Bonferroni over "
                                f"{len(chains)} chains), a chain stopping at its first failure")
        if best is None:
            return Decline(self._frontier_reason(quality, delta, n, tried, before), details)
        row, groups, modules, agreement = best
        ranks_of = [[modules[f"{l}.{name}"].rank for name in names] for l in range(N)]
        after, after_bytes = row["parameters"], row["bytes"]
        details.update({
            "shared_blocks": row["shared_blocks"], "rank": row["rank"], "tie_map": groups,
            "guarantee": (f"with probability >= {1 - delta:.3g} over the calibration draw, mean agreement with the "
                          f"original >= {quality} (every setting tested counted: Bonferroni over chains, "
                          "fixed-sequence testing within each; assumes served inputs are drawn like the calibration data)"),
            "measured_agreement": round(agreement, 5), "parameters_after": after, "bytes_after": after_bytes,
            "parameters_saved": before - after, "bytes_saved": before_bytes - after_bytes,
            "stack_parameter_reduction": round(1 - after / before, 4),
            "model_parameter_reduction": round((before - after) / model_before, 4),
        })
        return RecursionPlan(s.kind, groups, names, ranks_of, c.sharing, c.init, modules=modules, agreement=agreement,
                             details=details)

    def _shared_block_counts(self, N: int) -> list[int]:
        c = self.config
        if c.shared_blocks is not None:
            low = 3 if c.sharing == "middle_cycle" else 1
            return sorted({int(k) for k in c.shared_blocks if low <= k < N}, reverse=True)
        if c.sharing == "middle_cycle":
            return sorted({k for k in range(3, N) if (N - 2) % (k - 2) == 0 and (N - 2) // (k - 2) >= 2}, reverse=True)
        return sorted({k for k in range(2, N // 2 + 1) if N % k == 0}, reverse=True)

    def _split(self, ctx, batches: list[dict]) -> tuple[list[dict], list[dict]]:
        """(rows that fit the deltas — whitening, distillation — and rows that calibrate); every row
        calibrates when nothing is fitted."""
        if not self._fits(self.config):
            return [], batches
        sizes = [b["input_ids"].shape[0] for b in batches]
        rows = sum(sizes)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(ctx.config.seed))
        to_fit = torch.zeros(rows, dtype=torch.bool)
        to_fit[order[:min(rows - 1, max(1, round(rows * float(self.config.distill_fraction))))]] = True
        fit, cal, start = [], [], 0
        for b, size in zip(batches, sizes):
            part = to_fit[start:start + size]
            start += size
            for keep, out in ((part, fit), (~part, cal)):
                if keep.any():
                    out.append({k: v[keep] for k, v in b.items()})
        return fit, cal

    @staticmethod
    def _fits(c: RecursionConfig) -> bool:
        """Whether anything is fitted on calibration rows (which then do not calibrate)."""
        return bool(c.distill_steps) or c.delta_init == "whitened" or c.init == "weighted"

    @staticmethod
    def _count(ctx, s: LayerStack, modules: dict[str, RelaxedLinear], before: int, model_before: int) -> dict:
        """Parameters the stack holds with `modules` installed (shared weights once, deltas counted)."""
        edit = _installed(ctx, s.layers_path, modules)
        try:
            after, after_bytes = unique_parameters(s.layers)
        finally:
            edit.rollback()
        return {"parameters": after, "bytes": after_bytes, "stack_fraction": round(after / before, 4),
                "model_fraction": round((model_before - before + after) / model_before, 4)}

    def _measure(self, ctx, s: LayerStack, modules: dict[str, RelaxedLinear], fit: list[dict],
                 cal: list[dict]) -> tuple[float, dict | None]:
        """Agreement with the original on the calibration rows with `modules` installed, after distilling
        their deltas on the fit rows if asked."""
        c = self.config
        edit = _installed(ctx, s.layers_path, modules)
        try:
            distilled = None
            deltas = [p for m in modules.values() for p in (m.delta_a, m.delta_b) if p is not None]
            if c.distill_steps and deltas and fit:
                from ..calibrate.distill import distill_outputs

                distilled = distill_outputs(ctx.working, ctx.original, fit, s.kind, deltas, steps=int(c.distill_steps),
                                            lr=float(c.distill_lr), seed=ctx.config.seed, progress=ctx.config.progress,
                                            desc="distilling recursion deltas").to_dict()
            return runtime_agreement(ctx.original, ctx.working, s.kind, cal), distilled
        finally:
            edit.rollback()

    @staticmethod
    def _frontier_reason(quality: float, delta: float, n: int, tried: list[dict], before: int) -> str:
        tested = [t for t in tried if t.get("tested")]
        if not tested:
            return (f"no setting saves parameters over the {before} of the original stack; the model is left unchanged")
        frontier = "; ".join(f"K={t['shared_blocks']} rank {t['rank']}: {t['stack_fraction']:.0%} of the stack's "
                             f"parameters, agreement {t['agreement']:.4f}" for t in tested)
        need = min_samples(quality, delta)
        short = f"; at least {need} calibration rows are needed even at agreement 1" if n < need else ""
        return (f"no relaxed setting is certified at quality {quality} with confidence {1 - delta:.2f} on {n} "
                f"calibration rows{short}; measured frontier: {frontier}; the model is left unchanged")

    # -- apply / rebuild ---------------------------------------------------------------------------
    def apply(self, ctx: CompileContext, site: Site, plan: RecursionPlan, edit: ModuleEdit) -> None:
        for path, module in plan.modules.items():
            edit.replace(f"{site.path}.{path}", module)

    def rebuild(self, module: nn.Module, plan: RecursionPlan, model: nn.Module) -> nn.Module:
        """For adaptc.load: the relaxed modules of a saved plan, tied as the plan's groups say, at zero;
        the load_state_dict that follows fills them (each shared weight once per block)."""
        s = find_layer_stack(model)
        if s is None or s.kind != plan.kind or s.layers is not module:
            found = "none" if s is None else f"a {s.kind} stack at {s.layers_path!r}"
            raise SaveLoadError(f"the plan is for the layer stack of a {plan.kind}; the rebuilt "
                                f"{type(model).__name__} has {found}")
        if len(plan.ranks) != len(module):
            raise SaveLoadError(f"the plan has {len(plan.ranks)} positions, the stack {len(module)} blocks")
        names = linear_names(module)
        if isinstance(names, str) or not set(plan.names) <= set(names):
            raise SaveLoadError(f"the plan relaxes {plan.names}, the rebuilt blocks have Linear layers "
                                f"{names if not isinstance(names, str) else 'that differ: ' + names}")
        try:
            modules = empty_relaxed_modules(module, plan.groups, plan.names, plan.ranks)
        except ValueError as exc:
            raise SaveLoadError(str(exc)) from None
        install(module, modules)
        return module

    # -- verify: what check measured, on the installed modules ------------------------------------------
    def verify(self, ctx: CompileContext, plans: dict[str, RecursionPlan]) -> Comparison:
        (path, plan), = plans.items()
        quality = ctx.config.quality or DEFAULT_QUALITY
        total = ctx.runs_like_original()
        if not total.ok:
            return total
        installed = relaxed_of(ctx.working.get_submodule(path))
        if set(installed) != set(plan.modules) or any(installed[k] is not m for k, m in plan.modules.items()):
            return Comparison(math.inf, math.inf, 1, False, "the installed modules are not the plan's")
        _, cal = self._split(ctx, self.config.batches(ctx))
        measured = runtime_agreement(ctx.original, ctx.working, plan.kind, cal)
        plan.details["runtime_agreement_on_calibration_data"] = round(measured, 5)
        total.max_rel = total.max_abs = 1.0 - measured
        if measured < quality:
            total.ok, total.why = False, f"runtime agreement {measured:.4f} < quality {quality} on the calibration data"
        return total


def _installed(ctx: CompileContext, layers_path: str, modules: dict[str, RelaxedLinear]) -> ModuleEdit:
    """`modules` in place in the working model, through an edit whose rollback puts the Linears back."""
    edit = ModuleEdit(ctx.working)
    for path, module in modules.items():
        edit.replace(f"{layers_path}.{path}", module)
    return edit


def _rows(batches: list[dict], kind: str) -> int:
    """Samples the agreement averages over: rows, or an LM's real tokens."""
    if kind != "causal_lm":
        return sum(b["input_ids"].shape[0] for b in batches)
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
