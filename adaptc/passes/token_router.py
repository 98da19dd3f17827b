"""token_router: tokens leave an encoder's stack once the rest of it no longer matters for them.

Encoders / classifiers (BERT-like): a linear router per block, distilled from the frozen model on
unlabeled calibration rows. Its label is how much the rest of the stack, run for this token, changes
the final output: for a [CLS] classifier the gradient-times-state of the teacher's top-1 margin with
respect to the token's state entering the block (first order: what removing the token there costs the
prediction); for a mean-pooled embedding the part of the token's remaining state change that turns the
pooled direction. The router is the ridge fit of that label's log (within a row) on the state; only
its ranking within a row is used. At run time each row keeps its best `keep[i]` share of real tokens
at block i (runtime/token_router.py: dropped tokens leave the dense batch and rejoin for pooling).

Capacity schedules are fixed before looking at the data: families by first routed block, each a
sequence from conservative to aggressive (keep (1 - lam)^(depth) at lam on LEVELS). Each family is
run for real on calibration rows the routers were not fitted on, in order, and certified by
Learn-then-Test (fixed-sequence testing, Hoeffding-Bentkus p-values, delta / families each:
Bonferroni), so the chosen schedule's mean agreement with the original is >= `quality` with
probability >= 1 - delta. A cost model (weight and attention multiply-adds of the tokens each block
ran, measured on those rows) picks the cheapest certified schedule. Nothing certified: the pass
declines with the measured risks.

With early_exit on the same encoder (this pass runs after it), the routed loop runs the exits too and
the certification measures the two together against the original.

Causal LMs: per-token skips on the stack controller (a `TokenSkipPolicy`): a router per block reads
the token's own normed state (causal: it never looks ahead) and the token skips the block when the
score is below the block's threshold; the controller projects the K/V later tokens need from its state,
so cached and uncached generation agree. Thresholds come from a fixed sequence of skip shares,
certified on next-token agreement of the real runtime. Per-sequence routing at prefill (MindSkip) is
not built.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..analysis.layer_stack import LayerStack, find_layer_stack
from ..errors import AdaptcError, SaveLoadError
from ..runtime.early_exit import EarlyExitEncoder, cosine01, masked_mean
from ..runtime.stack_controller import take_rows
from ..analysis.kv_projection import kv_projection_for, no_kv_projection_reason
from ..runtime.token_router import (RoutedEncoder, RouterPlan, SkipPlan, TokenScorer, install_lm_skips,
                                    plan_from_dict)
from ..verify import Comparison
from ._base import CompileContext, Decline, ModuleEdit, Pass, Plan, Site
from ._config import option
from .early_exit import (DEFAULT_QUALITY, CalibratedConfig, _is_int, _is_number, _valid, _weights, layer_states,
                         runtime_agreement, stack_sites)

LEVELS = (0.03, 0.06, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)
LM_SKIP_SHARES = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25)  # per block, of the fitting tokens


@dataclass(frozen=True)
class TokenRouterConfig(CalibratedConfig):
    """token_router's options (compile's `quality` sets the agreement target)."""

    distill_fraction: float = option(0.3, doc="share of calibration rows that fit the routers (the rest certify)")
    router_ridge: float = option(1e-2, doc="ridge of a router's least-squares fit")
    min_keep: float = option(0.1, doc="the smallest share of a row's tokens any block runs")
    first_routed: int | None = option(None, doc="the one first routed block to try; None: block 1 and the middle block")

    def validate(self) -> None:
        super().validate()
        for name in ("distill_fraction", "min_keep"):
            if not _is_number(getattr(self, name)) or not 0.0 < getattr(self, name) < 1.0:
                self.fail(name, "must be a number in (0, 1)")
        if not _is_number(self.router_ridge) or self.router_ridge < 0:
            self.fail("router_ridge", "must be a number >= 0")
        if self.first_routed is not None and (not _is_int(self.first_routed) or self.first_routed < 1):
            self.fail("first_routed", "must be None or an integer >= 1 (block 0 gives the routers their context)")


@dataclass
class TokenRouterPlan(Plan):
    """The certified capacity schedule of one encoder. Saved: the schedule and the router width (the
    routers' weights are in the state_dict)."""

    router: RouterPlan | SkipPlan
    hidden: int
    routers: nn.ModuleList | None = None     # fitted at compile; on load built at zero, filled by load_state_dict
    lenses: nn.ModuleList | None = None      # embeddings: dropped tokens' map onto the last block's state (same)
    runtime_agreement: float | None = None   # measured with the real runtime on the certifying rows

    def to_dict(self) -> dict[str, Any]:
        return {**self.router.to_dict(), "hidden": self.hidden}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenRouterPlan":
        if not isinstance(data, dict):
            raise SaveLoadError(f"a token router plan is an object, not {type(data).__name__}")
        hidden = data.get("hidden")
        if not _is_int(hidden) or hidden < 1:
            raise SaveLoadError(f"the token router plan needs the router width, got hidden={hidden!r}")
        return cls(plan_from_dict({k: v for k, v in data.items() if k != "hidden"}), hidden)


def schedules(num_layers: int, start: int, min_keep: float) -> list[list[float]]:
    """The family starting at block `start`: keep (1 - lam)^(i - start + 1) at block i >= start, one
    schedule per lam on LEVELS (conservative first)."""
    return [[1.0 if i < start else max(min_keep, (1.0 - lam) ** (i - start + 1)) for i in range(num_layers)]
            for lam in LEVELS]


# -- distillation labels -----------------------------------------------------------------------------

def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def token_importance(model: nn.Module, layers: nn.ModuleList, batch: dict, kind: str) -> tuple:
    """(states entering every block [L] x [B, S, D], importance, last block's states). A classifier's
    importance ([L] x [B, S]) is how much running the rest of the stack for the token changes the
    prediction (final: None); an embedding model's needs the lenses first (importance None, see
    embedding_labels)."""
    states: list[torch.Tensor] = []

    def enter(module, args, kwargs):
        h = _hidden_arg(args, kwargs)
        if not states:  # block 0: the leaf the gradient flows back to
            h = h.detach().requires_grad_(kind == "classifier")
            args = (h, *args[1:]) if args else args
            kwargs = kwargs if args else {**kwargs, "hidden_states": h}
        elif h.requires_grad:
            h.retain_grad()
        states.append(h)
        return args, kwargs

    hooks = [layer.register_forward_pre_hook(enter, with_kwargs=True) for layer in layers]
    try:
        with torch.enable_grad() if kind == "classifier" else torch.no_grad():
            out = model(**batch)
            if kind == "classifier":
                top = out.logits.float().topk(min(2, out.logits.shape[-1]), dim=-1).values
                margin = top[:, 0] - top[:, -1] if top.shape[1] > 1 else top[:, 0]
                margin.sum().backward()
    finally:
        for h in hooks:
            h.remove()
    if kind == "classifier":
        return [s.detach() for s in states], [(s.grad * s).sum(-1).abs().detach() for s in states], None
    return [s.detach() for s in states], None, out.last_hidden_state.detach()


@torch.no_grad()
def embedding_labels(states: list[torch.Tensor], final: torch.Tensor, valid: torch.Tensor,
                     lenses: nn.ModuleList) -> list[torch.Tensor]:
    """[L] x [B, S]: the error a token dropped before block i leaves in the mean-pooled embedding — its
    final state minus what the block's lens makes of its state there — across the pooled direction,
    relative to the pooled norm."""
    pooled = masked_mean(final, valid)
    norm = pooled.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    u = pooled / norm
    labels = []
    for i, s in enumerate(states):
        miss = final - (lenses[i](s) if i else s)
        miss = miss - (miss * u[:, None]).sum(-1, keepdim=True) * u[:, None]
        labels.append(miss.norm(dim=-1) / norm)
    return labels


@torch.no_grad()
def fit_router(router: TokenScorer, states: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None,
               ridge: float) -> float:
    """Ridge fit of log importance on the state, centred per row when `rows` are given (an encoder uses
    only a row's ranking; an LM's threshold compares across tokens); returns the fit's rank correlation
    with the label on these tokens (for the report)."""
    x = states.double()
    y = torch.log(labels.double() + 1e-6 * float(labels.mean()) + 1e-12)
    for r in (rows.unique() if rows is not None else []):
        here = rows == r
        y[here] -= y[here].mean()
    x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    gram = x1.T @ x1
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    sol = torch.linalg.solve(gram, x1.T @ y)
    router.score.weight.copy_(sol[:-1].unsqueeze(0).to(router.score.weight.dtype))
    router.score.bias.copy_(sol[-1:].to(router.score.bias.dtype))
    pred = x1 @ sol
    rank = lambda v: v.argsort().argsort().double()  # noqa: E731
    a, b = rank(pred), rank(y)
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _split_rows(batches: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Calibration rows, split once (seeded) into the routers' fitting rows and the certifying rows."""
    total = sum(b["input_ids"].shape[0] for b in batches)
    if total < 2:
        raise AdaptcError("token_router needs at least 2 calibration rows: some to fit the routers, some to certify")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    fit = torch.zeros(total, dtype=torch.bool)
    fit[perm[:min(total - 1, max(1, round(total * fraction)))]] = True
    out: tuple[list[dict], list[dict]] = ([], [])
    start = 0
    for b in batches:
        n = b["input_ids"].shape[0]
        here = fit[start:start + n]
        for part, rows in ((out[0], here), (out[1], ~here)):
            if bool(rows.any()):
                part.append(take_rows(b, rows, n))
        start += n
    return out


def _row_agreement(kind: str, want: Any, got: Any, valid: torch.Tensor) -> torch.Tensor:
    if kind == "classifier":
        return (want.logits.argmax(-1) == got.logits.argmax(-1)).double()
    return cosine01(masked_mean(got.last_hidden_state, valid), masked_mean(want.last_hidden_state, valid)).double()


class TokenRouter(Pass):
    name = "token_router"
    exact = False
    needs_calibration = True
    keeps_blocks = True  # per-row token counts are data-dependent: they do not export as one graph
    config_class = TokenRouterConfig
    plan_class = TokenRouterPlan

    def no_sites_reason(self) -> str:
        return "no BERT-like encoder / classifier or causal-LM layer stack"

    def match(self, ctx: CompileContext) -> list[Site]:
        return stack_sites(ctx)

    def check(self, ctx: CompileContext, site: Site) -> TokenRouterPlan | Decline:
        quality = ctx.config.quality or DEFAULT_QUALITY
        delta = float(self.config.delta)
        s: LayerStack = site.info["stack"]
        details: dict[str, Any] = {"kind": s.kind, "quality": quality, "delta": delta, "num_layers": len(s.layers)}
        if len(s.layers) < 2:
            return Decline("one block: there is no later block to route tokens past", details)
        if s.kind == "causal_lm":
            if kv_projection_for(s.layers) is None:
                return Decline(f"{no_kv_projection_reason(s.layers)}: skipped tokens would leave holes in the cache", details)
            found = self._plan_lm(ctx, s, quality, delta, details)
        else:
            found = self._plan_encoder(ctx, site, s, quality, delta, details)
        if isinstance(found, str):
            details["declined"] = found
            return Decline(found, details)
        found.details = details
        return found

    def _plan_encoder(self, ctx: CompileContext, site: Site, s: LayerStack, quality: float, delta: float,
                      details: dict[str, Any]) -> TokenRouterPlan | str:
        from ..calibrate.thresholds import METHOD, fixed_sequence_test, min_samples

        c, L, D = self.config, len(s.layers), s.hidden
        fit_batches, test_batches = _split_rows(self.config.batches(ctx), float(c.distill_fraction), ctx.config.seed)
        teacher_layers = find_layer_stack(ctx.original).layers  # hooks go where the teacher runs
        # Fit: one router per block after the first, on the fitting rows' real tokens ([CLS] is always kept).
        feats: list[list[torch.Tensor]] = [[] for _ in range(L)]
        labels: list[list[torch.Tensor]] = [[] for _ in range(L)]
        rows: list[list[torch.Tensor]] = [[] for _ in range(L)]
        ref = next(s.layers.parameters())
        collected = [(b, *token_importance(ctx.original, teacher_layers, b, s.kind)) for b in fit_batches]
        lenses = None  # (batch, states, importance, final) per fitting batch
        if s.kind == "embedding":  # dropped tokens rejoin the mean through a lens onto the last block's state
            from ..calibrate.distill import least_squares_init
            from ..runtime.early_exit import ExitAdapter

            lenses = nn.ModuleList(ExitAdapter(D) for _ in range(L)).to(ref.device, ref.dtype)
            for p in lenses.parameters():
                p.requires_grad_(False)
            for i in range(1, L):
                least_squares_init([lenses[i].adapter], [torch.cat([st[i][_valid(b)] for b, st, _, _ in collected])],
                                   torch.cat([final[_valid(b)] for b, _, _, final in collected]))
            collected = [(b, st, embedding_labels(st, final, _valid(b), lenses), None) for b, st, _, final in collected]
        seen = 0
        for b, states, imp, _ in collected:
            use = _valid(b).clone()
            use[:, 0] = False
            row_id = torch.arange(seen, seen + use.shape[0]).unsqueeze(1).expand_as(use)
            seen += use.shape[0]
            for i in range(1, L):
                feats[i].append(states[i][use])
                labels[i].append(imp[i][use])
                rows[i].append(row_id[use])
        del collected
        routers = nn.ModuleList(TokenScorer(D) for _ in range(L)).to(ref.device, ref.dtype)
        for p in routers.parameters():
            p.requires_grad_(False)
        fit_quality = {}
        for i in range(1, L):
            fit_quality[str(i)] = round(fit_router(routers[i], torch.cat(feats[i]), torch.cat(labels[i]),
                                                   torch.cat(rows[i]), float(c.router_ridge)), 4)
        del feats, labels, rows
        n_test = sum(b["input_ids"].shape[0] for b in test_batches)
        details.update({"fit_rows": seen, "certify_rows": n_test,
                        "router": "linear score of the state entering the block (ridge fit of the log importance)",
                        "router_rank_correlation_on_fit_tokens": fit_quality,
                        "label": ("|gradient x state| of the teacher's top-1 margin at the block's input" if s.kind == "classifier"
                                  else "the error the token's lens leaves in its final state, across the pooled direction, "
                                       "relative to the pooled norm")})

        # Certify: run each schedule for real on the certifying rows, against the original's outputs.
        with torch.no_grad():
            want = [ctx.original(**b) for b in test_batches]
        layer_weights = _weights(s.layers[0])
        base = sum(layer_weights * b["input_ids"].numel() + 2 * D * b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2
                   for b in test_batches) * L  # what the original computes, padding included

        encoder = ctx.working.get_submodule(s.stack_path)
        routed = RoutedEncoder(encoder, RouterPlan(s.kind, [1.0] * L), routers, lenses)
        edit = ModuleEdit(ctx.working)
        edit.replace(s.stack_path, routed)
        measured: dict[tuple[int, int], dict[str, Any]] = {}

        def run(start: int, j: int, keep: list[float]) -> float:
            routed.plan = RouterPlan(s.kind, keep)
            routed.stats.reset(L)
            agree = []
            with torch.no_grad():
                for b, w in zip(test_batches, want):
                    agree.append(_row_agreement(s.kind, w, edit.root(**b), _valid(b)))
            st = routed.stats
            cost = sum(layer_weights * t + 2 * D * t2 for t, t2 in zip(st.tokens, st.tokens_squared))
            cost += sum(D * st.tokens[i] for i in range(L) if keep[i] < 1.0)  # the routers themselves
            a = torch.cat(agree)
            measured[(start, j)] = {"keep": [round(k, 4) for k in keep], "agreement": round(float(a.mean()), 5),
                                    "expected_cost": round(cost / base, 4),
                                    "keep_rate_per_block": [round(r, 4) for r in st.keep_rates()]}
            return 1.0 - float(a.mean())

        starts = [int(c.first_routed)] if c.first_routed is not None else sorted({1, max(1, L // 2)})
        starts = [st for st in starts if st < L]
        if not starts:
            edit.rollback()
            return f"first_routed={c.first_routed} leaves no block to route in a stack of {L}"
        share = delta / len(starts)
        tested, certified = [], []
        try:
            for start in starts:
                family = schedules(L, start, float(c.min_keep))
                result = fixed_sequence_test(len(family), lambda j: run(start, j, family[j]), n_test, quality, share)
                tested.append({"first_routed": start, "certified": len(result.certified),
                               "stopped_at": None if result.stopped is None else
                               {**measured[(start, result.stopped[0])], "p_value": round(result.stopped[2], 5)}})
                certified += [(measured[(start, j)]["expected_cost"], start, j, p) for j, _, p in result.certified]
            if certified:
                cost, start, j, p = min(certified, key=lambda t: (t[0], t[1], t[2]))
                keep = schedules(L, start, float(c.min_keep))[j]
                speed = self._measured_speed(ctx, edit, routed, keep, test_batches[0])
        finally:
            edit.rollback()
        details["candidates"] = tested
        details["frontier"] = sorted(({"first_routed": st, **m} for (st, _), m in measured.items()),
                                     key=lambda m: m["expected_cost"])  # every schedule run, cheapest first
        details["cost_model"] = ("weight and attention multiply-adds of the tokens each block ran on the certifying rows, "
                                 "over the original's (padding included); routers included")
        if not certified:
            first_fail = [t["stopped_at"] for t in tested if t["stopped_at"]]
            worst = min(first_fail, key=lambda f: 1 - f["agreement"]) if first_fail else {}
            need = min_samples(quality, share) if quality < 1 else math.inf
            short = f"; certifying {quality} at all needs >= {need} certifying rows" if n_test < need else ""
            return (f"no capacity schedule meets quality {quality} with confidence {1 - delta:.2f}: the most conservative "
                    f"ones agree {worst.get('agreement')} with the original on {n_test} certifying rows "
                    f"(keep {worst.get('keep')}, expected cost {worst.get('expected_cost')}, Hoeffding-Bentkus p-value "
                    f"{worst.get('p_value')} > {share:.3g}){short}; the model is left unchanged")
        chosen = measured[(start, j)]
        if chosen["expected_cost"] >= 1.0 - 1e-9:
            return (f"the cheapest certified schedule would not save work: expected cost {chosen['expected_cost']} of the "
                    "original; the model is left unchanged")
        details.update({
            "procedure": METHOD, "keep": chosen["keep"], "first_routed": start,
            "guarantee": (f"with probability >= {1 - delta:.3g} over the calibration draw, mean agreement with the original "
                          f">= {quality} ({METHOD} at delta/{len(starts)} for each of {len(starts)} schedule families, "
                          "Bonferroni; assumes served inputs are drawn like the calibration data)"),
            "p_value": round(p, 6), "measured_agreement": chosen["agreement"],
            "keep_rate_per_block": chosen["keep_rate_per_block"],
            "drop_rate_per_block": [round(1 - r, 4) for r in chosen["keep_rate_per_block"]],
            "expected_cost": chosen["expected_cost"], "expected_speedup": round(1.0 / chosen["expected_cost"], 3),
            **speed,
        })
        if isinstance(encoder, EarlyExitEncoder):
            details["with_early_exit"] = ("the routed loop runs early_exit's exits; the certification measured both "
                                          "together against the original (the exits' thresholds were calibrated on the same "
                                          "draw and are treated as fixed)")
        return TokenRouterPlan(RouterPlan(s.kind, keep), D, routers, lenses, runtime_agreement=chosen["agreement"])

    @staticmethod
    def _measured_speed(ctx: CompileContext, edit: ModuleEdit, routed: RoutedEncoder, keep: list[float],
                        batch: dict) -> dict[str, Any]:
        """The original vs the routed model on one certifying batch, interleaved, best of 3."""
        routed.plan = RouterPlan(routed.plan.kind, keep)
        times = {"original": math.inf, "routed": math.inf}
        with torch.no_grad():
            for _ in range(3):
                for name, m in (("original", ctx.original), ("routed", edit.root)):
                    start = time.perf_counter()
                    m(**batch)
                    times[name] = min(times[name], time.perf_counter() - start)
        return {"measured_speedup_on_a_calibration_batch": round(times["original"] / times["routed"], 3),
                "measured_batch_shape": list(batch["input_ids"].shape)}

    def _plan_lm(self, ctx: CompileContext, s: LayerStack, quality: float, delta: float,
                 details: dict[str, Any]) -> TokenRouterPlan | str:
        """Per-token skips: a router per block (after the first) predicts, from the token's normed state,
        the log of the block's relative update ||h_out - h_in|| / ||h_in|| on the teacher; a token skips
        the block when the prediction is below a threshold. Thresholds: the same share of the fitting
        tokens at every block, LM_SKIP_SHARES from small to large, certified in order on next-token
        agreement of the real runtime (projected K/V included) over the certifying passages."""
        from ..calibrate.thresholds import METHOD, fixed_sequence_test
        from ..runtime.token_router import lm_skips_of

        c, L, D = self.config, len(s.layers), s.hidden
        fit_batches, test_batches = _split_rows(self.config.batches(ctx), float(c.distill_fraction), ctx.config.seed)
        teacher_layers = find_layer_stack(ctx.original).layers
        feats: list[list[torch.Tensor]] = [[] for _ in range(L)]
        labels: list[list[torch.Tensor]] = [[] for _ in range(L)]
        with torch.no_grad():
            for b in fit_batches:
                _, states = layer_states(ctx.original, teacher_layers, b)
                valid = _valid(b)
                for i in range(1, L):
                    h_in, h_out = states[i][valid], states[i + 1][valid]
                    feats[i].append(s.norm(h_in))
                    labels[i].append((h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp(min=1e-6))
        ref = s.lm_head.weight
        routers = nn.ModuleList(TokenScorer(D) for _ in range(L)).to(ref.device, ref.dtype)
        for p in routers.parameters():
            p.requires_grad_(False)
        fit_quality, scores = {}, [None] * L
        for i in range(1, L):
            x = torch.cat(feats[i])
            fit_quality[str(i)] = round(fit_router(routers[i], x, torch.cat(labels[i]), None, float(c.router_ridge)), 4)
            with torch.no_grad():
                scores[i] = routers[i](x).float()
        family = [[-math.inf] + [float(torch.quantile(scores[i], share)) for i in range(1, L)] for share in LM_SKIP_SHARES]
        del feats, labels, scores
        n_tokens = int(sum(_valid(b).sum() for b in test_batches))
        details.update({"fit_passages": sum(b["input_ids"].shape[0] for b in fit_batches),
                        "certify_passages": sum(b["input_ids"].shape[0] for b in test_batches), "certify_tokens": n_tokens,
                        "router": "linear score of the final norm of the state entering the block (ridge fit of the log "
                                  "relative block update on the teacher); skip below a per-block threshold",
                        "router_rank_correlation_on_fit_tokens": fit_quality,
                        "samples": "tokens; tokens of one passage are not independent, so the guarantee treats them as "
                                   "i.i.d. (an approximation)"})
        with torch.no_grad():
            want = [ctx.original(**b).logits.argmax(-1) for b in test_batches]
        block, kv, head = _weights(s.layers[0]), kv_projection_for(s.layers).kv_weights(s.layers[0]), s.lm_head.weight.numel()
        edit = ModuleEdit(ctx.working)
        install_lm_skips(ctx.working, s.layers, SkipPlan([-math.inf] * L), s.norm, routers, set_attr=edit.set_attr)
        policy = lm_skips_of(ctx.working)
        measured: list[dict[str, Any]] = []

        def run(j: int) -> float:
            policy.plan = SkipPlan(family[j])
            policy.stats.reset(L)
            hits = 0
            with torch.no_grad():
                for b, w in zip(test_batches, want):
                    valid = _valid(b)
                    hits += int((edit.root(**b).logits.argmax(-1) == w)[valid].sum())
            rates = policy.stats.skip_rates()
            cost = (sum((1 - r) * block + r * kv + (D if i else 0) for i, r in enumerate(rates)) + head) / (L * block + head)
            measured.append({"skip_share": LM_SKIP_SHARES[j], "agreement": round(hits / n_tokens, 5),
                             "expected_cost": round(cost, 4), "skip_rate_per_block": [round(r, 4) for r in rates]})
            return 1.0 - hits / n_tokens

        try:
            result = fixed_sequence_test(len(family), run, n_tokens, quality, delta)
        finally:
            edit.rollback()
        details["frontier"] = sorted(measured, key=lambda m: m["expected_cost"])
        details["cost_model"] = ("weight multiply-adds per decoded token: a skipped block still pays its K/V projection; "
                                 "the LM head and the routers included")
        if not result.certified:
            j, risk, p = result.stopped
            return (f"no skip threshold meets quality {quality} with confidence {1 - delta:.2f}: skipping "
                    f"{LM_SKIP_SHARES[j]:.0%} of tokens per block agrees {1 - risk:.4f} on {n_tokens} certifying tokens "
                    f"(Hoeffding-Bentkus p-value {p:.3g} > {delta:g}; measured frontier: "
                    + ", ".join(f"{m['agreement']:.3f} at {1 / m['expected_cost']:.3f}x" for m in measured)
                    + "); the model is left unchanged")
        best = min(result.certified, key=lambda t: (measured[t[0]]["expected_cost"], t[0]))
        chosen = measured[best[0]]
        if chosen["expected_cost"] >= 1.0 - 1e-9:
            return f"the certified skips would not save work (expected cost {chosen['expected_cost']}); the model is left unchanged"
        details.update({
            "procedure": METHOD, "skip_share": chosen["skip_share"], "p_value": round(best[2], 6),
            "guarantee": (f"with probability >= {1 - delta:.3g} over the calibration draw, mean next-token agreement with "
                          f"the original >= {quality} ({METHOD}; assumes served text is drawn like the calibration data)"),
            "measured_agreement": chosen["agreement"], "skip_rate_per_block": chosen["skip_rate_per_block"],
            "expected_cost": chosen["expected_cost"], "expected_decode_speedup": round(1 / chosen["expected_cost"], 3),
        })
        return TokenRouterPlan(SkipPlan(family[best[0]]), D, routers, runtime_agreement=chosen["agreement"])

    # -- apply / load -------------------------------------------------------------------------------
    def apply(self, ctx: CompileContext, site: Site, plan: TokenRouterPlan, edit: ModuleEdit) -> None:
        s: LayerStack = site.info["stack"]
        if s.kind == "causal_lm":
            install_lm_skips(ctx.working, s.layers, plan.router, s.norm, plan.routers, set_attr=edit.set_attr)
            return
        encoder = ctx.working.get_submodule(s.stack_path)
        edit.replace(s.stack_path, RoutedEncoder(encoder, plan.router, plan.routers, plan.lenses))

    def rebuild(self, module: nn.Module, plan: TokenRouterPlan, model: nn.Module) -> nn.Module:
        """For adaptc.load: the routed loop on the rebuilt encoder (an EarlyExitEncoder if early_exit was
        re-applied first); routers start at zero and the load_state_dict that follows fills them."""
        s = find_layer_stack(model)
        if s is None or s.kind != plan.router.kind or model.get_submodule(s.stack_path) is not module:
            found = "none" if s is None else f"a {s.kind} stack at {s.stack_path!r}"
            raise SaveLoadError(f"the plan is for the encoder of a {plan.router.kind}; the rebuilt {type(model).__name__} "
                                f"has {found}")
        per_block = plan.router.thresholds if s.kind == "causal_lm" else plan.router.keep
        if len(per_block) != len(s.layers):
            raise SaveLoadError(f"the plan routes tokens for {len(per_block)} blocks; the stack has {len(s.layers)}")
        ref = next(module.parameters())
        routers = nn.ModuleList(TokenScorer(plan.hidden) for _ in s.layers).to(ref.device, ref.dtype)
        for p in routers.parameters():
            p.requires_grad_(False)
        if s.kind == "causal_lm":
            install_lm_skips(model, s.layers, plan.router, s.norm, routers)
            return module
        lenses = None
        if s.kind == "embedding":
            from ..runtime.early_exit import ExitAdapter

            lenses = nn.ModuleList(ExitAdapter(plan.hidden) for _ in s.layers).to(ref.device, ref.dtype)
        return RoutedEncoder(module, plan.router, routers, lenses)

    # -- verify: quality on calibration data, not bitwise equality -----------------------------------
    def verify(self, ctx: CompileContext, plans: dict[str, TokenRouterPlan]) -> Comparison:
        (plan,) = plans.values()
        quality = ctx.config.quality or DEFAULT_QUALITY
        total = ctx.runs_like_original()
        if not total.ok:
            return total
        measured = plan.runtime_agreement
        if measured is None:
            measured = runtime_agreement(ctx.original, ctx.working, plan.router.kind, self.config.batches(ctx))
        plan.details["runtime_agreement_on_certifying_rows"] = round(measured, 5)
        total.max_rel = total.max_abs = 1.0 - measured
        if measured < quality:
            total.ok, total.why = False, f"runtime agreement {measured:.4f} < quality {quality} on the calibration data"
        return total
