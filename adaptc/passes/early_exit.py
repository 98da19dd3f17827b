"""early_exit: let easy inputs leave the layer stack early, with the quality loss bounded and measured.

Encoders / classifiers (BERT-like; ALBERT as the steps of its loop over one shared layer group, so exits
halt rows between loop steps): an exit after every block but the last, each with a small affine
head distilled from the frozen model (classifier: its pooler + classifier read the head's [CLS];
embedding model: the head maps the mean-pooled state onto the final embedding). Causal LMs
(Llama / GPT-2-like): the model's own final norm + LM head at exits spaced by the cost model, each
exit's state first moved by a residual affine adapter fitted (ridge regression) onto the last
block's state. The confidence measure (softmax max, top-1/top-2 margin, state saturation, or for
LMs a learned linear predictor of agreement, which needs no LM head at the exit) is picked per model by
calibration; thresholds come from Learn-then-Test (adaptc.calibrate.thresholds) on calibration rows
the heads were not trained on. When nothing meets `quality`, the pass declines and says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..analysis.kv_projection import kv_projection_for, no_kv_projection_reason
from ..analysis.layer_stack import LayerStack, find_layer_stack
from ..errors import AdaptcError, SaveLoadError
from ..runtime.early_exit import (EarlyExitEncoder, ExitAdapter, ExitPlan, LMExitHeads, cosine01, encoder_readout,
                                  encoder_runtime_of, encoder_signals, exit_stats, install_lm_exits, lm_exits_of,
                                  lm_token_signals, masked_mean, predictor_features)
from ..verify import Comparison
from ._base import CompileContext, Decline, Knob, ModuleEdit, Pass, Plan, Site
from ._config import PassConfig, option

ENCODER_MEASURES = {"classifier": ("softmax_max", "margin", "saturation"), "embedding": ("saturation",)}
LM_MEASURES = ("softmax_max", "margin", "saturation", "learned")
LM_SPACINGS = (1, 2, 3, 4, 6, 8)
LM_DRIFT_ROUNDS = 3
RAW_SAMPLE = 512
DEFAULT_QUALITY, DEFAULT_DELTA = 0.99, 0.1
LADDER = 24  # threshold settings offered to a joint quality budget, "never exit" included
# Under a joint budget the thresholds are certified on rows of their own, so the fitting rows go mostly to
# the heads; the rest only shape the ladder (as the single pass's distill_fraction does with more rows).
KNOB_FIT_FRACTION = 0.7


def calibration_batches(calibration: Any, tokenizer: Any = None, size: int = 16,
                        max_len: int = 128) -> list[dict[str, torch.Tensor]]:
    """Calibration data as keyword batches: texts (with a tokenizer, `size` texts a batch), tokenizer
    outputs / dicts, or tensors of token ids."""
    items = list(calibration)
    if items and all(isinstance(x, str) for x in items):
        tok = tokenizer
        if tok is None:
            raise AdaptcError("calibration is text: pass tokenizer=... to compile() so it can be tokenized")
        size, max_len = int(size), int(max_len)
        return [dict(tok(items[i:i + size], return_tensors="pt", padding=True, truncation=True, max_length=max_len))
                for i in range(0, len(items), size)]
    out = []
    for x in items:
        if hasattr(x, "args") and hasattr(x, "kwargs"):  # compile() wraps each batch as Inputs
            x = x.kwargs if x.kwargs else x.args
        if isinstance(x, torch.Tensor):
            out.append({"input_ids": x if x.dim() == 2 else x.unsqueeze(0)})
        elif isinstance(x, dict) or hasattr(x, "keys"):
            out.append({k: v for k, v in dict(x).items() if isinstance(v, torch.Tensor)})
        elif isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
            out.append({"input_ids": x[0]})
        else:
            raise AdaptcError(f"calibration items must be texts, token-id tensors or tokenizer outputs, got {type(x).__name__}")
    if not out:
        raise AdaptcError("calibration data is empty")
    return out


def _valid(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)


@torch.no_grad()
def layer_states(model: nn.Module, layers: nn.ModuleList, batch: dict) -> tuple[Any, list[torch.Tensor]]:
    """The model's output and the states entering block 0 and leaving every block ([L+1] x [B, S, H]).
    A looped stack (ALBERT) repeats one module in `layers`: each module is hooked once and every call of
    it is one step."""
    states: list[torch.Tensor] = []

    def entering(m, a, kw):
        if not states:  # a shared block's later calls are later steps, not the stack's input
            states.append((a[0] if a else kw["hidden_states"]).detach())

    hooks = [layers[0].register_forward_pre_hook(entering, with_kwargs=True)]
    for layer in dict.fromkeys(layers):  # each module once, in order
        hooks.append(layer.register_forward_hook(lambda m, a, o: states.append((o[0] if isinstance(o, tuple) else o).detach())))
    try:
        out = model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return out, states


@torch.no_grad()
def runtime_agreement(original: nn.Module, compiled: nn.Module, kind: str, batches: list[dict]) -> float:
    """Agreement of `compiled` with `original`: same class / cosine of the mean-pooled embedding /
    same next token (every real token, exits and their K/V propagation included)."""
    rows = [agreement_rows(output_summary(original(**b), kind, b), output_summary(compiled(**b), kind, b), kind)
            for b in batches]
    return float(torch.cat(rows).sum()) / max(sum(r.numel() for r in rows), 1)


def output_summary(out: Any, kind: str, batch: dict) -> torch.Tensor:
    """What agreement compares, small enough to keep for many batches: the predicted class per row,
    the mean-pooled embedding per row, or the next token per real token (causal LM)."""
    if kind == "classifier":
        return out.logits.argmax(-1)
    if kind == "embedding":
        return masked_mean(out.last_hidden_state, _valid(batch))
    return out.logits[_valid(batch)].argmax(-1)


def agreement_rows(want: torch.Tensor, got: torch.Tensor, kind: str) -> torch.Tensor:
    """Per sample agreement in [0, 1] of two output summaries: the losses Learn-then-Test certifies."""
    return cosine01(got, want) if kind == "embedding" else (want == got).float()


def _weights(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def cost_fractions(exit_layers: list[int], layer_cost: float, exit_cost: float, num_layers: int, *,
                   shared_cost: float = 0.0, skipped_cost: float = 0.0, leave_cost: float = 0.0) -> list[float]:
    """Cost of leaving at each exit, then of running every block (every exit evaluated, none taken),
    as fractions of the original model: the last entry is above 1, so exits that do not pay for their
    own evaluation show up as a loss and the pass declines them. Leaving after block l costs its l+1
    blocks, the exits evaluated so far, `skipped_cost` per block skipped (an LM's K/V propagation) and
    `leave_cost` once (an adapter); `shared_cost` every path pays (an LM's final head)."""
    full = num_layers * layer_cost + shared_cost
    leave = [(l + 1) * layer_cost + (e + 1) * exit_cost + (num_layers - l - 1) * skipped_cost + leave_cost + shared_cost
             for e, l in enumerate(exit_layers)]
    return [c / full for c in leave] + [(full + len(exit_layers) * exit_cost) / full]


def choose_exits(trials: list[tuple[str, list[int], torch.Tensor, torch.Tensor, list[float]]],
                 quality: float, delta: float, details: dict[str, Any]) -> ExitPlan | str:
    """Calibrate every (measure, exits, confidence, agreement, cost) candidate at delta / #candidates
    (Bonferroni, so the chosen one keeps the guarantee) and keep the cheapest feasible. `details`
    (with its "kind") gets the candidates, the guarantee and the measured figures; a string says why not."""
    from ..calibrate.thresholds import calibrate_thresholds

    share = delta / len(trials)
    tried, best = [], None
    for measure, exits, conf, agree, cost in trials:
        cal = calibrate_thresholds(conf, agree, cost, quality=quality, delta=share, seed=0)
        tried.append({"measure": measure, "exit_layers": exits, "feasible": cal.feasible,
                      "expected_cost": round(cal.expected_cost, 4), "agreement": round(cal.agreement, 4),
                      "reason": cal.reason})
        if cal.feasible and (best is None or cal.expected_cost < best[2].expected_cost - 1e-9):
            best = (measure, exits, cal)
    details["candidates"] = tried
    if best is None:
        why = next((t["reason"] for t in tried if t["reason"]), "")
        return (f"no exit meets quality {quality} with confidence {1 - delta:.2f} on the calibration data "
                f"(tried {len(trials)} measure/exit settings{': ' + why if why else ''}); the model is left unchanged")
    measure, exits, cal = best
    if cal.expected_cost >= 1.0 - 1e-9:
        return (f"calibrated exits would not pay for their own evaluation: expected cost {cal.expected_cost:.3f} "
                f"of the original ({measure} at blocks {exits}); the model is left unchanged")
    details.update({
        "measure": measure, "exit_layers": exits, "procedure": cal.method,
        "guarantee": (f"with probability >= {1 - delta:.3g} over the calibration draw, mean agreement with the "
                      f"original >= {quality} ({cal.method} at delta/{len(trials)} for each of {len(trials)} "
                      "measure/exit candidates, Bonferroni; assumes served inputs are drawn like the calibration data)"),
        "calibration": cal.to_dict(), "measured_agreement": cal.agreement, "exit_histogram": cal.exit_histogram,
        "expected_cost": cal.expected_cost, "expected_speedup": round(1.0 / cal.expected_cost, 3),
    })
    return ExitPlan(details["kind"], exits, list(cal.thresholds), measure)


@dataclass(frozen=True)
class CalibratedConfig(PassConfig):
    """What every pass calibrated on a layer stack takes: how calibration text becomes batches, and the
    guarantee's failure probability."""

    tokenizer: Any = option(None, data=False, doc="tokenizes calibration given as text")
    calibration_batch: int = option(16, doc="texts per calibration batch")
    max_length: int = option(128, doc="tokens per calibration text, at most")
    delta: float = option(DEFAULT_DELTA, doc="the quality guarantee holds with probability 1 - delta")

    def validate(self) -> None:
        for name in ("calibration_batch", "max_length"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                self.fail(name, "must be an integer >= 1")
        if not _is_number(self.delta) or not 0.0 < self.delta < 1.0:
            self.fail("delta", "must be a number in (0, 1)")

    def batches(self, ctx: CompileContext) -> list[dict[str, torch.Tensor]]:
        return calibration_batches(ctx.calibration, self.tokenizer, self.calibration_batch, self.max_length)


def stack_sites(ctx: CompileContext) -> list[Site]:
    """The model's layer stack as the one site of a pass that acts on it (none: no stack found)."""
    s = find_layer_stack(ctx.working)
    return [Site(s.stack_path, ctx.working.get_submodule(s.stack_path), {"stack": s})] if s else []


@dataclass(frozen=True)
class EarlyExitConfig(CalibratedConfig):
    """early_exit's options (compile's `quality` sets the agreement target)."""

    distill_fraction: float = option(0.4, doc="share of calibration rows (passages for an LM) that fit the exit heads")
    distill_steps: int = option(300, doc="distillation steps for encoder exit heads")
    distill_lr: float = option(1e-3, doc="distillation learning rate")
    adapter_ridge: float = option(1e-2, doc="ridge of an LM exit's residual adapter fit")
    first_exit: int | None = option(None, doc="first block an LM may exit after; None: half the blocks")

    def validate(self) -> None:
        super().validate()
        if not _is_number(self.distill_fraction) or not 0.0 < self.distill_fraction < 1.0:
            self.fail("distill_fraction", "must be a number in (0, 1)")
        if not _is_int(self.distill_steps) or self.distill_steps < 0:
            self.fail("distill_steps", "must be an integer >= 0")
        if not _is_number(self.distill_lr) or self.distill_lr <= 0:
            self.fail("distill_lr", "must be a number > 0")
        if not _is_number(self.adapter_ridge) or self.adapter_ridge < 0:
            self.fail("adapter_ridge", "must be a number >= 0")
        if self.first_exit is not None and (not _is_int(self.first_exit) or self.first_exit < 0):
            self.fail("first_exit", "must be None or an integer >= 0")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class EarlyExitPlan(Plan):
    """The calibrated exits of one layer stack. Saved: the exit plan and the exit heads' count and
    width (their weights are in the state_dict); the fitted heads and what check measured at run time
    exist only during compile."""

    exits: ExitPlan
    hidden: int
    heads: nn.Module | None = None          # fitted at compile; on load built at zero, filled by load_state_dict
    runtime_agreement: float | None = None  # an LM's agreement measured with the real runtime in check

    def to_dict(self) -> dict[str, Any]:
        return {**self.exits.to_dict(), "heads": len(self.exits.exit_layers), "hidden": self.hidden}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EarlyExitPlan":
        exits = ExitPlan.from_dict({k: v for k, v in data.items() if k not in ("heads", "hidden")})
        heads, hidden = data.get("heads"), data.get("hidden")
        if heads != len(exits.exit_layers) or not isinstance(hidden, int) or hidden < 1:
            raise SaveLoadError(f"the plan needs one exit head per exit layer ({len(exits.exit_layers)}) and a hidden "
                                f"size, got heads={heads!r}, hidden={hidden!r}")
        return cls(exits, hidden)


class EarlyExit(Pass):
    name = "early_exit"
    exact = False
    needs_calibration = True
    keeps_blocks = True  # exits are data-dependent control flow between blocks: they do not export
    config_class = EarlyExitConfig
    plan_class = EarlyExitPlan

    def no_sites_reason(self) -> str:
        return "no BERT-like encoder / classifier or causal-LM layer stack with a final norm and LM head"

    def match(self, ctx: CompileContext) -> list[Site]:
        return stack_sites(ctx)

    # -- check: distil, measure, calibrate (the verdict needs all of it) --------------------------
    def check(self, ctx: CompileContext, site: Site) -> EarlyExitPlan | Decline:
        quality = ctx.config.quality or DEFAULT_QUALITY
        delta = float(self.config.delta)
        s: LayerStack = site.info["stack"]
        batches = self.config.batches(ctx)
        teacher_layers = find_layer_stack(ctx.original).layers  # hooks go where the teacher runs
        details = {"kind": s.kind, "quality": quality, "delta": delta, "num_layers": len(s.layers),
                   "calibration_batches": len(batches)}
        if s.kind == "causal_lm":
            if kv_projection_for(s.layers) is None:
                why = f"{no_kv_projection_reason(s.layers)}: exited tokens would leave holes in the cache"
                return Decline(why, details)
            found = self._plan_lm(ctx, s, teacher_layers, batches, quality, delta, details)
        else:
            found = self._plan_encoder(ctx, s, teacher_layers, batches, quality, delta, details)
        if isinstance(found, str):
            details["declined"] = found
            return Decline(found, details)
        found.details = details
        return found

    def _plan_encoder(self, ctx, s: LayerStack, teacher_layers: nn.ModuleList, batches, quality, delta,
                      details: dict[str, Any]) -> EarlyExitPlan | str:
        fitted = self._fit_encoder(ctx, s, teacher_layers, batches, details)
        if isinstance(fitted, str):
            return fitted
        heads, hidden, trials = fitted
        chosen = choose_exits(trials, quality, delta, details)
        return chosen if isinstance(chosen, str) else EarlyExitPlan(chosen, hidden, heads)

    def _fit_encoder(self, ctx, s: LayerStack, teacher_layers: nn.ModuleList, batches, details: dict[str, Any],
                     fit_fraction: float | None = None) -> tuple[nn.ModuleList, int, list] | str:
        """Exit heads distilled on part of the rows, and every measure's (confidence, agreement, cost)
        on the rest: what choose_exits (one pass) or the joint budget's ladder is built from."""
        from ..calibrate.distill import cosine_to_teacher, distill_heads, kl_to_teacher, least_squares_init

        L = len(s.layers)
        if L < 2:
            return "one block: there is nowhere to exit early"
        readouts, teacher = [], []
        for b in batches:
            out, states = layer_states(ctx.original, teacher_layers, b)
            valid = _valid(b)
            readouts.append(torch.stack([encoder_readout(s.kind, h, valid) for h in states]))  # [L+1, B, H]
            teacher.append(out.logits if s.kind == "classifier" else masked_mean(out.last_hidden_state, valid))
        R, T = torch.cat(readouts, 1), torch.cat(teacher)
        n = T.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.config.seed))
        n_train = int(n * float(fit_fraction or self.config.distill_fraction))
        train, held = perm[:n_train], perm[n_train:]
        exits = list(range(L - 1))
        hidden = R.shape[-1]
        heads = nn.ModuleList(ExitAdapter(hidden) for _ in exits).to(R.device, R.dtype)
        tail = s.tail
        if s.kind == "classifier":
            student, loss = (lambda head, x: tail(head(x))), kl_to_teacher
        else:
            student, loss = (lambda head, x: head(x)), cosine_to_teacher
        least_squares_init([h.adapter for h in heads], [R[l + 1][train] for l in exits], R[L][train])
        distilled = distill_heads(heads, [R[l + 1][train] for l in exits], T[train], student, loss,
                                  steps=int(self.config.distill_steps), lr=float(self.config.distill_lr),
                                  seed=ctx.config.seed, progress=ctx.config.progress)
        details["distillation"] = {"rows": int(train.numel()), **distilled.to_dict()}
        with torch.no_grad():
            sig = [encoder_signals(s.kind, heads[e], tail, R[l][held], R[l + 1][held]) for e, l in enumerate(exits)]
            if s.kind == "classifier":
                want = T[held].argmax(-1)
                agree = torch.stack([(x["top1"] == want).float() for x in sig], 1)
            else:
                agree = torch.stack([cosine01(x["embedding"], T[held]) for x in sig], 1)
        details["per_exit_agreement"] = [round(float(a), 4) for a in agree.mean(0)]
        seq = max(b["input_ids"].shape[1] for b in batches)
        layer_cost = _weights(s.layers[0]) * seq
        exit_cost = hidden * hidden + (_weights(tail) if tail is not None else 0)
        cost = cost_fractions(exits, layer_cost, exit_cost, L)
        details.update({"calibration_rows": int(held.numel()), "cost_model": "weight multiply-adds per row"})
        trials = [(m, exits, torch.stack([x[m] for x in sig], 1), agree, cost) for m in ENCODER_MEASURES[s.kind]]
        return heads, hidden, trials

    @torch.no_grad()
    def _lm_states(self, ctx, teacher_layers: nn.ModuleList, batches, candidates: list[int],
                   fit_fraction: float) -> tuple[dict, dict]:
        """Real tokens' states from the block entering the first candidate exit to the last block
        ([len(candidates) + 2, n, D]) and the full model's next tokens, split by passage into a part
        that fits the exit heads and a part that calibrates the thresholds."""
        rows = sum(b["input_ids"].shape[0] for b in batches)
        if rows < 2:
            raise AdaptcError("early exit on a causal LM needs at least 2 calibration passages: one to fit the exit "
                              "heads on, one to calibrate the thresholds on")
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(ctx.config.seed))
        to_fit = torch.zeros(rows, dtype=torch.bool)
        to_fit[order[:min(rows - 1, max(1, round(rows * fit_fraction)))]] = True
        parts = {True: {"states": [], "want": []}, False: {"states": [], "want": []}}
        start = 0
        for b in batches:
            out, states = layer_states(ctx.original, teacher_layers, b)
            valid = _valid(b)
            stack = torch.stack(states[candidates[0]:])  # [len(candidates) + 2, B, S, D]
            for r in range(valid.shape[0]):
                part = parts[bool(to_fit[start + r])]
                part["states"].append(stack[:, r][:, valid[r]])
                part["want"].append(out.logits[r][valid[r]].argmax(-1))
            start += valid.shape[0]
        fit, cal = ({"states": torch.cat(p["states"], 1), "want": torch.cat(p["want"])} for p in (parts[True], parts[False]))
        return fit, cal

    @staticmethod
    def _heads_for(plan: ExitPlan, fitted: LMExitHeads, candidates: list[int]) -> LMExitHeads:
        """The fitted heads of the plan's exits (predictors only where the plan's measure reads them)."""
        heads = LMExitHeads(fitted.adapters[0].adapter.in_features, len(plan.exit_layers), plan.measure == "learned")
        for e, layer in enumerate(plan.exit_layers):
            c = candidates.index(layer)
            heads.adapters[e].load_state_dict(fitted.adapters[c].state_dict())
            if heads.predictors is not None:
                heads.predictors[e].load_state_dict(fitted.predictors[c].state_dict())
        ref = fitted.adapters[0].adapter.weight
        return heads.to(ref.device, ref.dtype)

    def _plan_lm(self, ctx, s: LayerStack, teacher_layers: nn.ModuleList, batches, quality, delta,
                 details: dict[str, Any]) -> EarlyExitPlan | str:
        fitted = self._fit_lm(ctx, s, teacher_layers, batches, details)
        if isinstance(fitted, str):
            return fitted
        heads, candidates, D, trials = fitted
        # The thresholds are fitted on the full model's states, but at run time later tokens attend to
        # exited tokens' propagated K/V. Measure that drift with the real runtime and, where it costs
        # agreement, refit against a target raised by the shortfall (each round pays its delta share).
        target, step, rounds = quality, 0.0, []
        for _ in range(LM_DRIFT_ROUNDS):
            chosen = choose_exits(trials, target, delta / LM_DRIFT_ROUNDS, details)
            if isinstance(chosen, str):
                break
            plan = EarlyExitPlan(chosen, D, self._heads_for(chosen, heads, candidates))
            edit = ModuleEdit(ctx.working)
            install_lm_exits(ctx.working, s.layers, plan.exits, s.norm, s.lm_head, plan.heads, set_attr=edit.set_attr)
            try:
                measured = runtime_agreement(ctx.original, ctx.working, "causal_lm", batches)
            finally:
                edit.rollback()
            rounds.append({"ltt_target": round(target, 5), "calibrated_agreement": round(details["measured_agreement"], 5),
                           "runtime_agreement": round(measured, 5),
                           "expected_speedup": details["expected_speedup"]})
            if measured >= quality:
                plan.runtime_agreement = measured  # verify() reuses it: same plan, same data
                chosen = plan
                break
            # Raise the target by the drift itself (what calibration promised minus what the runtime
            # gave), and at least double the last step: a raise too small to move a threshold gives
            # the same plan again.
            drift = details["measured_agreement"] - measured
            step = max(2 * step, quality - measured + 1e-3)
            target = max(target + step, quality + drift + 1e-3)
            chosen = f"with K/V propagation the runtime agreement stays below {quality} (last {measured:.4f})"
            if target >= 1.0:
                chosen += f"; covering a drift of {drift:.4f} would need a calibrated agreement of 1"
                break
        details["drift_rounds"] = rounds
        return chosen

    def _fit_lm(self, ctx, s: LayerStack, teacher_layers: nn.ModuleList, batches, details: dict[str, Any],
                fit_fraction: float | None = None) -> tuple[LMExitHeads, list[int], int, list] | str:
        """Adapters and predictors fitted on some passages, every (measure, spacing) trial measured on
        the others: (heads, candidate exit blocks, width, trials)."""
        from ..calibrate.distill import fit_agreement_predictor, least_squares_init

        L = len(s.layers)
        first = self.config.first_exit
        first = L // 2 if first is None else int(first)  # earlier blocks rarely agree with the last
        candidates = list(range(first, L - 1))
        if not candidates:
            return "too few blocks to place an exit"
        # Passages, not tokens, are split between fitting (adapters, predictors) and calibrating the
        # thresholds: tokens of one passage are alike, and the guarantee needs unseen data.
        fit, cal = self._lm_states(ctx, teacher_layers, batches, candidates,
                                   float(fit_fraction or self.config.distill_fraction))
        D = fit["states"].shape[-1]
        ref = s.lm_head.weight
        heads = LMExitHeads(D, len(candidates), predictors=True).to(ref.device, ref.dtype)
        with torch.no_grad():
            least_squares_init([heads.adapters[c].adapter for c in range(len(candidates))],
                               [fit["states"][c + 1] for c in range(len(candidates))], fit["states"][-1],
                               ridge=float(self.config.adapter_ridge))
            for part in (fit, cal):
                part["signals"] = [lm_token_signals(s.norm, s.lm_head, part["states"][c], heads.adapters[c](part["states"][c + 1]))
                                   for c in range(len(candidates))]
                part["agree"] = torch.stack([(x["top1"] == part["want"]).float() for x in part["signals"]], 1)
            # For the report: what the adapters bought (on a sample: it costs an LM head per exit).
            few = slice(0, RAW_SAMPLE)
            raw = torch.stack([(lm_token_signals(s.norm, s.lm_head, cal["states"][c, few], cal["states"][c + 1, few])["top1"]
                                == cal["want"][few]).float().mean() for c in range(len(candidates))])
        for c in range(len(candidates)):
            feats = [predictor_features(s.norm, part["states"][c], part["states"][c + 1]) for part in (fit, cal)]
            fit_agreement_predictor(heads.predictors[c], feats[0], fit["agree"][:, c])
            with torch.no_grad():
                cal["signals"][c]["learned"] = torch.sigmoid(heads.predictors[c](feats[1]).squeeze(-1))
        A = cal["agree"]
        C = {m: torch.stack([x[m] for x in cal["signals"]], 1) for m in LM_MEASURES}
        # str keys: the report is JSON and must read the same after adaptc.save / adaptc.load
        details["per_layer_agreement"] = {str(l): round(float(a), 4) for l, a in zip(candidates, A.mean(0))}
        details["per_layer_agreement_without_adapter"] = {str(l): round(float(a), 4) for l, a in zip(candidates, raw)}
        details["without_adapter_tokens"] = min(RAW_SAMPLE, int(A.shape[0]))
        details.update({"calibration_tokens": int(A.shape[0]), "fit_tokens": int(fit["want"].numel()),
                             "cost_model": "weight multiply-adds per decoded token (K/V propagation and the final "
                                           "LM head included)",
                             "exit_head": "a residual affine adapter (ridge fit onto the last block's state), then the "
                                          "model's final norm + LM head; learned: a linear agreement predictor",
                             "samples": "tokens; tokens of one passage are not independent, so the guarantee "
                                        "treats them as i.i.d. (an approximation)"})
        layer_cost, head_cost = _weights(s.layers[0]), s.lm_head.weight.numel()
        kv_cost = kv_projection_for(s.layers).kv_weights(s.layers[0])
        exit_cost = {"softmax_max": head_cost + D * D, "margin": head_cost + D * D, "saturation": D, "learned": D + 1}
        trials = []
        for spacing in LM_SPACINGS:
            exits = sorted(l for l in range(L - 1 - spacing, first - 1, -spacing))
            if not exits:
                continue
            cols = [candidates.index(l) for l in exits]
            for m in LM_MEASURES:
                cost = cost_fractions(exits, layer_cost, exit_cost[m], L, shared_cost=head_cost,
                                      skipped_cost=kv_cost, leave_cost=D * D)
                trials.append((m, exits, C[m][:, cols], A[:, cols], cost))
        return heads, candidates, D, trials

    # -- joint quality budget (adaptc/budget.py) -------------------------------------------------
    def knob(self, ctx: CompileContext, sites: list[Site]) -> Knob | Decline:
        """Heads fitted as for one pass; the measure and exit blocks that choose_exits finds cheapest on
        these (fitting) rows; then that measure's Learn-then-Test threshold family, thinned to a ladder
        from "never exit" to the most aggressive. Nothing here is certified: the budget does it."""
        from ..calibrate.thresholds import threshold_family

        (site,) = sites
        quality = ctx.config.quality or DEFAULT_QUALITY
        s: LayerStack = site.info["stack"]
        batches = self.config.batches(ctx)
        teacher_layers = find_layer_stack(ctx.original).layers
        details = {"kind": s.kind, "num_layers": len(s.layers), "calibration_batches": len(batches)}
        if s.kind == "causal_lm":
            if kv_projection_for(s.layers) is None:
                return Decline(f"{no_kv_projection_reason(s.layers)}: exited tokens would leave holes in the cache", details)
            fitted = self._fit_lm(ctx, s, teacher_layers, batches, details, KNOB_FIT_FRACTION)
        else:
            fitted = self._fit_encoder(ctx, s, teacher_layers, batches, details, KNOB_FIT_FRACTION)
        if isinstance(fitted, str):
            return Decline(fitted, details)
        trials = fitted[-1]
        pick = choose_exits(trials, quality, float(self.config.delta), {"kind": s.kind})
        measure, exits = (pick.measure, pick.exit_layers) if isinstance(pick, ExitPlan) else trials[0][:2]
        _, _, conf, agree, cost = next(t for t in trials if t[0] == measure and t[1] == exits)
        family = threshold_family(conf, agree, grid=64)
        if len(family) > LADDER - 1:  # evenly thinned, the most aggressive kept
            family = [family[round(j * (len(family) - 1) / (LADDER - 2))] for j in range(LADDER - 1)]
        ladder = [[math.inf] * len(exits)] + family
        if s.kind == "causal_lm":
            heads, candidates, D, _ = fitted
            heads = self._heads_for(ExitPlan(s.kind, exits, ladder[0], measure), heads, candidates)
        else:
            heads, D, _ = fitted
        details.update({"measure": measure, "exit_layers": exits, "cost_model": "weight multiply-adds per "
                        + ("decoded token" if s.kind == "causal_lm" else "row")})
        settings = [{"measure": measure, "exit_layers": exits,
                     "thresholds": [None if math.isinf(t) else round(float(t), 6) for t in th]} for th in ladder]

        def plans(i: int) -> dict[str, Plan]:
            thresholds = [math.inf if t is None else t for t in settings[i]["thresholds"]]
            return {site.path: EarlyExitPlan(ExitPlan(s.kind, exits, thresholds, measure), D, heads, details=details)}

        def cost_left(model: nn.Module) -> float:
            """Mean cost fraction of where rows (tokens) left since the setting was installed."""
            hist = exit_stats(model).histogram
            runtime = encoder_runtime_of(model) or lm_exits_of(model)
            if sum(hist) == 0 or all(math.isinf(t) for t in runtime.plan.thresholds):
                return 1.0  # no exit is evaluated: the original's blocks, nothing more
            return sum(h * c for h, c in zip(hist, cost)) / sum(hist)

        return Knob(settings, plans, cost_left, details)

    def retune(self, model: nn.Module, setting: dict[str, Any], plans: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        runtime = encoder_runtime_of(model) or lm_exits_of(model)
        if runtime is None:
            raise AdaptcError("this module has no early-exit runtime to retune")
        if list(setting["exit_layers"]) != list(runtime.plan.exit_layers) or setting["measure"] != runtime.plan.measure:
            raise AdaptcError(f"the setting exits after blocks {setting['exit_layers']} by {setting['measure']}; the "
                              f"module's exits are {runtime.plan.exit_layers} by {runtime.plan.measure}")
        runtime.plan.thresholds = [math.inf if t is None else float(t) for t in setting["thresholds"]]
        runtime.stats.reset(len(runtime.plan.thresholds))
        return {path: {**data, "thresholds": list(setting["thresholds"])} for path, data in plans.items()}

    # -- apply -------------------------------------------------------------------------------------
    def apply(self, ctx: CompileContext, site: Site, plan: EarlyExitPlan, edit: ModuleEdit) -> None:
        s: LayerStack = site.info["stack"]
        if s.kind == "causal_lm":
            install_lm_exits(ctx.working, s.layers, plan.exits, s.norm, s.lm_head, plan.heads, set_attr=edit.set_attr)
        else:
            encoder = ctx.working.get_submodule(s.stack_path)
            edit.replace(s.stack_path, EarlyExitEncoder(encoder, plan.exits, plan.heads, s.tail, s.layers, s.prelude))

    # -- load --------------------------------------------------------------------------------------
    def rebuild(self, module: nn.Module, plan: EarlyExitPlan, model: nn.Module) -> nn.Module:
        """For adaptc.load: the exit runtime of a saved plan on the rebuilt model. Exit heads start at
        zero here and the load_state_dict that follows fills them; LM layers are gated in place. The
        model's own modules (pooler, classifier, norm, LM head) are found again."""
        exits = plan.exits
        s = find_layer_stack(model)
        if s is None or s.kind != exits.kind or model.get_submodule(s.stack_path) is not module:
            found = "none" if s is None else f"a {s.kind} stack at {s.stack_path!r}"
            raise SaveLoadError(f"the plan is for the layer stack of a {exits.kind}; "
                                f"the rebuilt {type(model).__name__} has {found}")
        if any(l >= len(s.layers) for l in exits.exit_layers):
            raise SaveLoadError(f"exit layers {exits.exit_layers} do not fit a stack of {len(s.layers)} blocks")
        ref, count = next(module.parameters()), len(exits.exit_layers)
        if s.kind == "causal_lm":
            lm_heads = LMExitHeads(plan.hidden, count, exits.measure == "learned").to(ref.device, ref.dtype)
            install_lm_exits(model, s.layers, exits, s.norm, s.lm_head, lm_heads)
            return module
        exit_heads = nn.ModuleList(ExitAdapter(plan.hidden) for _ in range(count)).to(ref.device, ref.dtype)
        return EarlyExitEncoder(module, exits, exit_heads, s.tail, s.layers, s.prelude)

    # -- verify: quality on calibration data, not bitwise equality ---------------------------------
    def verify(self, ctx: CompileContext, plans: dict[str, EarlyExitPlan]) -> Comparison:
        (plan,) = plans.values()  # one layer stack
        quality = ctx.config.quality or DEFAULT_QUALITY
        total = ctx.runs_like_original()
        if not total.ok:
            return total
        measured = plan.runtime_agreement
        if measured is None:
            measured = runtime_agreement(ctx.original, ctx.working, plan.exits.kind, self.config.batches(ctx))
        plan.details["runtime_agreement_on_calibration_data"] = round(measured, 5)
        total.max_rel = total.max_abs = 1.0 - measured
        if measured < quality:
            total.ok, total.why = False, f"runtime agreement {measured:.4f} < quality {quality} on the calibration data"
        return total
