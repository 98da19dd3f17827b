"""One quality budget across the approximate passes of a compile: their settings searched jointly and the
choice certified end to end, with the speed-vs-quality frontier kept in the report.

    fast = adaptc.compile(model, example, passes=["early_exit", "sparse_attention"], calibration=rows,
                          quality=0.95, delta=0.1)
    adaptc.report(fast)["frontier"]          # the operating points measured, the chosen one marked
    adaptc.retarget(fast, quality=0.9)       # another point certified for 0.9, without re-calibrating

How (PassManager runs this in place of the approximate passes when CompileConfig.budget says so):
1. The calibration items are split once (seeded): FIT (each pass's knob() fits its heads / measures
   its attention mass there), SEARCH and CERTIFY. Each pass offers a ladder of settings, most
   conservative first, and is applied at its first (which computes what the original does).
2. Search, on the SEARCH rows with the real compiled runtime: from every pass at its first setting,
   a greedy walk moves one pass one step at a time, the step that buys the most expected cost (each
   pass's cost model, composed as the product of the work each leaves) per agreement lost, until every
   step falls below the lowest quality of interest. Every point it runs is recorded.
3. Certify, on the CERTIFY rows (never used to fit or to search): the points on the measured Pareto
   frontier, ordered by their SEARCH agreement (most conservative first), are each run end to end
   and tested by Learn-then-Test with fixed-sequence testing: H_j "risk of point j > 1 - q" gets a
   Hoeffding-Bentkus p-value and is rejected at level delta, in order, stopping at the first failure.
   The order is fixed by data independent of the CERTIFY rows, so the family-wise error over every
   tested point is <= delta (the first true null in the sequence is rejected with probability <=
   delta, and no later one is reached without it); points the search tried but did not put in the
   sequence were never tested, and choosing them on independent rows costs no error either. This is
   done for each quality of QUALITIES (and the compile's): each quality's certificate holds at delta
   on its own, for a quality chosen without looking at the results.
4. The cheapest point certified for the compile's quality is installed; every pass's result says what
   it was given of the budget (its setting, the agreement it costs alone, its expected speed-up).
Nothing certified: every pass is left out, with the numbers.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

from .calibrate.thresholds import METHOD, hoeffding_bentkus_pvalue
from .errors import AdaptcError
from .passes._base import CompileContext, Decline, Knob, ModuleEdit, Pass, PassResult

QUALITIES = (0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995)
FIT_SHARE, SEARCH_SHARE = 0.5, 0.15  # of the calibration items; the rest (0.35) certify
MAX_EVALUATIONS = 64                # search runs on the SEARCH rows, at most
MAX_TESTED = 24                     # points in the fixed sequence, at most (no multiplicity cost: compute only)
SEARCH_MARGIN = 0.02                # the walk goes this far below the lowest quality of interest
DEFAULT_QUALITY, DEFAULT_DELTA = 0.99, 0.1


def joint_passes(passes: list[Pass], config: Any) -> list[Pass]:
    """The approximate passes that share one budget in this compile ([] when each calibrates alone)."""
    able = [p for p in passes if not p.exact and type(p).knob is not Pass.knob]
    if config.budget is False or not able or (config.budget is None and len(able) < 2):
        return []
    return able


def _delta(passes: list[Pass]) -> float:
    deltas = {float(p.config.delta) for p in passes if "delta" in p.config.field_names()}
    if len(deltas) > 1:
        raise AdaptcError(f"the passes of one quality budget need one delta, got {sorted(deltas)}: set delta= once")
    return deltas.pop() if deltas else DEFAULT_DELTA


def _batching(passes: list[Pass]) -> dict[str, Any]:
    """How calibration texts become batches: the options of the first pass that has them."""
    for p in passes:
        names = p.config.field_names()
        if "tokenizer" in names:
            return {"tokenizer": p.config.tokenizer, "size": p.config.calibration_batch, "max_len": p.config.max_length}
    return {}


def _kind(model: nn.Module) -> str:
    from .analysis.layer_stack import find_layer_stack

    stack = find_layer_stack(model)
    if stack is not None:
        return stack.kind
    return "causal_lm" if hasattr(model, "generate") else "classifier"


def _split(n: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    fit, search = max(1, round(n * FIT_SHARE)), max(1, round(n * SEARCH_SHARE))
    return sorted(order[:fit]), sorted(order[fit:fit + search]), sorted(order[fit + search:])


class _Runner:
    """Runs the working model at a joint setting on a set of rows: per-sample agreement with the
    original, wall time and the expected cost the passes' cost models give for what the runtime did."""

    def __init__(self, ctx: CompileContext, live: list[tuple[Pass, Knob]], kind: str):
        self.ctx, self.live, self.kind = ctx, live, kind

    def install(self, point: tuple[int, ...]) -> None:
        for (p, knob), i in zip(self.live, point):
            p.retune(self.ctx.working, knob.settings[i], {})

    @torch.no_grad()
    def reference(self, batches: list[dict]) -> tuple[list[torch.Tensor], float]:
        from .passes.early_exit import output_summary

        want = [output_summary(self.ctx.original(**b), self.kind, b) for b in batches]
        start = time.perf_counter()  # the second run is the one timed (the first warms caches)
        for b in batches:
            self.ctx.original(**b)
        return want, time.perf_counter() - start

    @torch.no_grad()
    def run(self, point: tuple[int, ...], batches: list[dict], want: list[torch.Tensor]) -> dict[str, Any]:
        from .passes.early_exit import agreement_rows, output_summary

        self.install(point)
        rows, start = [], time.perf_counter()
        for b, w in zip(batches, want):
            rows.append(agreement_rows(w, output_summary(self.ctx.working(**b), self.kind, b), self.kind))
        seconds = time.perf_counter() - start
        cost = math.prod(knob.cost(self.ctx.working) for _, knob in self.live)
        rows_t = torch.cat(rows).double()
        return {"agreement": float(rows_t.mean()), "n": int(rows_t.numel()), "seconds": seconds, "cost": cost}


def _walk(runner: _Runner, ladders: list[int], batches, want, floor: float) -> dict[tuple[int, ...], dict]:
    """The greedy joint search: one pass one step at a time, the best cost bought per agreement lost."""
    seen: dict[tuple[int, ...], dict] = {}

    def measure(point):
        if point not in seen:
            seen[point] = runner.run(point, batches, want)
        return seen[point]

    point = tuple(0 for _ in ladders)
    here = measure(point)
    while len(seen) < MAX_EVALUATIONS:
        steps = [point[:k] + (point[k] + 1,) + point[k + 1:] for k in range(len(ladders)) if point[k] + 1 < ladders[k]]
        scored = []
        for step in steps:
            if len(seen) >= MAX_EVALUATIONS and step not in seen:
                continue
            m = measure(step)
            if m["agreement"] >= floor:
                bought = here["cost"] - m["cost"]
                lost = max(here["agreement"] - m["agreement"], 0.0)
                scored.append(((bought + 1e-6) / (lost + 1e-3), step))
        if not scored:
            break
        point = max(scored)[1]
        here = measure(point)
    return seen


def _pareto(seen: dict[tuple[int, ...], dict]) -> list[tuple[int, ...]]:
    """Points no other point beats on both search agreement and expected cost, most agreeing first."""
    pts: dict[tuple[float, float], tuple[int, ...]] = {}  # equal measurements: the most conservative point
    for p in seen:
        if any(p):  # the all-first point is the fallback, not a hypothesis
            key = (seen[p]["agreement"], seen[p]["cost"])
            pts[key] = min(pts.get(key, p), p, key=lambda q: (sum(q), q))
    pts = list(pts.values())
    front = [p for p in pts if not any(
        seen[o]["agreement"] >= seen[p]["agreement"] and seen[o]["cost"] <= seen[p]["cost"]
        and (seen[o]["agreement"], -seen[o]["cost"]) != (seen[p]["agreement"], -seen[p]["cost"]) for o in pts)]
    front.sort(key=lambda p: (-seen[p]["agreement"], seen[p]["cost"], p))
    if len(front) > MAX_TESTED:  # evenly thinned, by search agreement order
        front = [front[round(j * (len(front) - 1) / (MAX_TESTED - 1))] for j in range(MAX_TESTED)]
    return front


def certify(sequence: list[dict], quality: float, delta: float) -> int:
    """Fixed-sequence Learn-then-Test: how many leading points of `sequence` (each with its held-out
    "agreement" and "n") are certified for mean agreement >= quality at family-wise error delta."""
    alpha = 1.0 - quality
    for j, m in enumerate(sequence):
        if hoeffding_bentkus_pvalue(1.0 - m["agreement"], m["n"], alpha) > delta:
            return j
    return len(sequence)


def run_budget(ctx: CompileContext, group: list[Pass], manager: Any) -> list[PassResult]:
    """Fit, search and certify `group` together on ctx; the passes' results (manager.budget: the record)."""
    from .passes.early_exit import calibration_batches

    quality = ctx.config.quality or DEFAULT_QUALITY
    delta = _delta(group)
    items = list(ctx.calibration or [])
    results: dict[str, PassResult] = {p.name: PassResult(p.name, "skipped") for p in group}
    if len(items) < 3:
        for r in results.values():
            r.reason = (f"a joint quality budget needs at least 3 calibration items (to fit, search and certify on "
                        f"separate rows), got {len(items)}")
        return list(results.values())
    fit_i, search_i, cert_i = _split(len(items), ctx.config.seed)
    fit_ctx = dataclasses.replace(ctx, calibration=[items[i] for i in fit_i])
    live: list[tuple[Pass, Knob]] = []
    edits: dict[str, ModuleEdit] = {}
    started = {p.name: time.perf_counter() for p in group}
    for p in group:
        r, edit = results[p.name], None
        sites = p.match(ctx)
        if not sites:
            r.reason = p.no_sites_reason()
            continue
        try:
            ctx.record_calls([s.path for s in sites])
            fit_ctx.working = ctx.working
            verdict = p.knob(fit_ctx, sites)
            if isinstance(verdict, str):
                verdict = Decline(verdict)
            if isinstance(verdict, Decline):
                r.reason, r.details = verdict.reason, verdict.details
                r.declined = [{"site": s.path, "reason": verdict.reason} for s in sites]
                continue
            edit = ModuleEdit(ctx.working)
            by_path = {s.path: s for s in sites}
            for path, plan in verdict.plans(0).items():
                p.apply(ctx, by_path[path], plan, edit)
                ctx.working = edit.root
                r.sites.append(path)
        except Exception as exc:  # a pass bug must not take the compile down: undo it and say so
            if edit is not None:
                edit.rollback()
                ctx.working = edit.root
            results[p.name] = PassResult(p.name, "rolled_back", reason=f"pass failed: {type(exc).__name__}: {exc}")
            continue
        edits[p.name] = edit
        live.append((p, verdict))
    if not live:
        return list(results.values())

    kind = _kind(ctx.original)
    batching = _batching(group)
    search = calibration_batches([items[i] for i in search_i], **batching)
    held = calibration_batches([items[i] for i in cert_i], **batching)
    runner = _Runner(ctx, live, kind)
    qualities = sorted({*QUALITIES, quality})
    search_start = time.perf_counter()
    want_search, t_search = runner.reference(search)
    seen = _walk(runner, [len(k.settings) for _, k in live], search, want_search, min(qualities) - SEARCH_MARGIN)
    front = _pareto(seen)
    want_held, _ = runner.reference(held)
    tested = {pt: runner.run(pt, held, want_held) for pt in front}
    sequence = [tested[pt] for pt in front]
    certified_for = {q: front[:certify(sequence, q, delta)] for q in qualities}
    search_seconds = time.perf_counter() - search_start

    frontier = []
    for n, (pt, m) in enumerate(sorted(seen.items(), key=lambda kv: (-kv[1]["agreement"], kv[1]["cost"]))):
        held_m = tested.get(pt)
        frontier.append({
            "id": n, "settings": {p.name: i for (p, _), i in zip(live, pt)},
            "labels": {p.name: _label(k.settings[i]) for (p, k), i in zip(live, pt)},
            "search_agreement": round(m["agreement"], 5), "search_rows": m["n"],
            "expected_speedup": round(1.0 / m["cost"], 4),
            "measured_speedup": round(t_search / m["seconds"], 4) if m["seconds"] > 0 else None,
            "tested": held_m is not None,
            "agreement": round(held_m["agreement"], 5) if held_m else None,
            "certify_rows": held_m["n"] if held_m else None,
            "held_out_expected_speedup": round(1.0 / held_m["cost"], 4) if held_m else None,
            "certified_for": [q for q in qualities if pt in certified_for[q]],
            "chosen": False,
        })
    ids = {tuple(f["settings"].values()): f for f in frontier}
    ok = certified_for[quality]
    record = {
        "quality": quality, "delta": delta, "qualities": qualities, "passes": [p.name for p, _ in live],
        "procedure": f"joint greedy search on search rows; {METHOD} on certify rows over the frontier's points in "
                     "order of search agreement (fixed-sequence testing: family-wise error <= delta over every tested "
                     "point, each quality tested on its own)",
        "rows": {"fit_items": len(fit_i), "search_items": len(search_i), "certify_items": len(cert_i),
                 "search_samples": seen[tuple(0 for _ in live)]["n"], "certify_samples": sequence[0]["n"] if sequence else 0},
        "sample": "rows" if kind != "causal_lm" else "tokens (tokens of one passage are not independent: an approximation)",
        "evaluations": {"search": len(seen), "certify": len(tested)},
        "search_seconds": round(search_seconds, 2),
        "knobs": {p.name: k.settings for p, k in live},
        "cost_model": {p.name: k.details.get("cost_model", "density-scaled attention multiply-adds") for p, k in live},
        "composition": "expected cost = product of the share of work each pass leaves",
        "chosen": None,
    }
    for p, _ in live:
        r = results[p.name]
        r.seconds = time.perf_counter() - started[p.name]
    best = min(ok, key=lambda pt: (tested[pt]["cost"], pt)) if ok else None
    if best is not None and tested[best]["cost"] >= 1.0 - 1e-9:  # as one pass declines exits that do not pay
        why = (f"the cheapest point certified for quality {quality} saves nothing: expected cost "
               f"{tested[best]['cost']:.3f} of the original ({', '.join(f'{n}: {l}' for n, l in ids[best]['labels'].items())})")
        best, ok = None, []
    else:
        why = ""
    if not ok:
        first = sequence[0] if sequence else None
        why = why or (f"no joint setting is certified end to end for quality {quality} at delta {delta}: the most conservative "
               f"tested point agrees {first['agreement']:.4f} on {first['n']} held-out samples "
               f"(p-value {hoeffding_bentkus_pvalue(1 - first['agreement'], first['n'], 1 - quality):.3g})"
               if first else f"no setting but the original keeps agreement >= {min(qualities) - SEARCH_MARGIN:.2f} "
                             "on the search rows")
        _roll_back(ctx, live, edits)
        for p, _ in live:
            r = results[p.name]
            r.status, r.reason, r.sites = "skipped", why, []
        record["declined"] = why
        manager.budget = {"record": record, "frontier": frontier}
        return list(results.values())

    runner.install(best)
    chosen = ids[best]
    chosen["chosen"] = True
    record["chosen"] = chosen["id"]
    record["spent"] = _spent(runner, live, best, seen, search, want_search)
    check = _runs_on_checks(ctx)
    if check:
        _roll_back(ctx, live, edits)
        record["declined"] = f"verification failed: {check}"
    for (p, knob), i in zip(live, best):
        r = results[p.name]
        if check:
            r.status, r.reason, r.sites = "rolled_back", record["declined"], []
            continue
        r.status, r.plans = "applied", knob.plans(i)
        r.details = {**knob.details, "budget": {"setting": _label(knob.settings[i]), **record["spent"][p.name]}}
        manager.edits[p.name] = edits[p.name]
    manager.budget = {"record": record, "frontier": frontier}
    manager.budget_verification = {
        "kind": "quality", "metric": "end-to-end agreement with the original", "target": quality, "delta": delta,
        "agreement": chosen["agreement"], "samples": chosen["certify_rows"], "procedure": record["procedure"]}
    return list(results.values())


def _roll_back(ctx: CompileContext, live: list[tuple[Pass, Knob]], edits: dict[str, ModuleEdit]) -> None:
    """Undo every live pass, the last applied first (later edits were made on top of earlier ones)."""
    for p, _ in reversed(live):
        edits[p.name].rollback()
        ctx.working = edits[p.name].root


def _spent(runner: _Runner, live, best, seen, search, want) -> dict[str, dict[str, Any]]:
    """How the budget went to each pass: its setting alone (the others at their first) on the search rows."""
    out = {}
    for k, (p, _) in enumerate(live):
        alone = tuple(best[k] if j == k else 0 for j in range(len(live)))
        m = seen.get(alone) or runner.run(alone, search, want)
        out[p.name] = {"agreement_lost_alone": round(1.0 - m["agreement"], 5),
                       "expected_speedup_alone": round(1.0 / m["cost"], 4)}
    joint = seen[best]
    total = sum(v["agreement_lost_alone"] for v in out.values())
    for v in out.values():
        v["share_of_loss"] = round(v["agreement_lost_alone"] / total, 4) if total > 0 else 0.0
    runner.install(best)
    out["joint"] = {"agreement_lost": round(1.0 - joint["agreement"], 5), "expected_speedup": round(1.0 / joint["cost"], 4)}
    return out


def _runs_on_checks(ctx: CompileContext) -> str:
    """'' when the working model runs every check input and gives the original's output type."""
    with torch.no_grad():
        for inputs, expected in zip(ctx.check_inputs, ctx.expected_outputs()):
            try:
                got = ctx.working(*inputs.args, **inputs.kwargs)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
            if type(got) is not type(expected):
                return f"output type differs: {type(got).__name__}"
    return ""


def _label(setting: dict[str, Any]) -> dict[str, Any]:
    """A setting as the frontier shows it (sparse patterns are long: only tau, density, cost)."""
    return {k: v for k, v in setting.items() if k != "patterns"}


# -- after compile: the frontier ------------------------------------------------------------------------

def frontier_of(module_or_report: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    report = module_or_report if isinstance(module_or_report, dict) else _state(module_or_report).report
    budget, frontier = report.get("budget"), report.get("frontier")
    if not isinstance(budget, dict) or not isinstance(frontier, list):
        raise AdaptcError("this module has no recorded frontier: compile it with two or more approximate passes "
                          "and one quality (or budget=True for one)")
    return budget, frontier


def _state(module: nn.Module) -> Any:
    from .runtime.module import state_of

    try:
        return state_of(module)
    except TypeError as exc:
        raise AdaptcError(str(exc)) from None


def retarget(module: nn.Module, quality: float) -> nn.Module:
    """Install the cheapest recorded operating point certified for `quality` (same delta), without
    re-calibrating; the report and the saved plan follow. AdaptcError lists the qualities available."""
    from .passes import registry
    from .runtime.module import CompiledModule

    state = _state(module)
    budget, frontier = frontier_of(state.report)
    if not isinstance(quality, (int, float)) or isinstance(quality, bool) or not 0.0 < quality <= 1.0:
        raise AdaptcError(f"retarget takes a quality in (0, 1], got {quality!r}")
    fits = [f for f in frontier if any(abs(q - quality) < 1e-9 for q in f.get("certified_for", []))]
    if not fits:
        available = sorted({q for f in frontier for q in f.get("certified_for", [])})
        raise AdaptcError(f"no recorded operating point is certified for quality {quality} at delta {budget['delta']}; "
                          f"certified: {available or 'none'} (of those tested: {budget['qualities']}); compile again "
                          "for another quality")
    if budget.get("declined"):
        raise AdaptcError(f"the quality budget left every pass out ({budget['declined']}): there is no operating point "
                          "installed to move from; compile again")
    if budget.get("rolled_back_after"):
        raise AdaptcError(f"compile's speed check rolled {', '.join(budget['rolled_back_after'])} back after the budget "
                          "was certified: the recorded frontier no longer describes this module")
    if isinstance(module, CompiledModule) and module.eager is not None:
        raise AdaptcError("this module runs a captured graph: its settings are fixed in it; retarget needs block "
                          "granularity (capture='blocks')")
    best = min(fits, key=lambda f: (1.0 / f["held_out_expected_speedup"], f["id"]))
    passes = registry()
    for name, i in best["settings"].items():
        state.plan[name] = passes[name]().retune(module, budget["knobs"][name][i], state.plan.get(name, {}))
    for f in frontier:
        f["chosen"] = f is best
    previous = budget.get("chosen")
    budget.update(chosen=best["id"], quality=quality)
    budget.setdefault("retargeted", []).append({"from_point": previous, "to_point": best["id"], "quality": quality})
    for entry in state.report.get("passes", []):
        if entry["name"] in best["settings"]:
            setting = budget["knobs"][entry["name"]][best["settings"][entry["name"]]]
            entry.setdefault("details", {}).setdefault("budget", {})["setting"] = _label(setting)
    state.report.setdefault("verification", {})["budget"] = {
        **state.report.get("verification", {}).get("budget", {}), "target": quality,
        "agreement": best["agreement"], "samples": best["certify_rows"]}
    return module


def plot_frontier(module_or_report: Any, path: str) -> str:
    """Draw the frontier (held-out agreement against expected and measured speed-up), the chosen point
    marked, to `path` (PNG by its suffix; matplotlib, headless). Returns the path."""
    try:
        import matplotlib
    except ImportError:
        raise AdaptcError("plotting the frontier needs matplotlib (pip install 'adaptc[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget, frontier = frontier_of(module_or_report)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([f["expected_speedup"] for f in frontier], [f["search_agreement"] for f in frontier], s=14,
               c="lightgray", label="searched (search rows)")
    tested = [f for f in frontier if f["tested"]]
    ok = [f for f in tested if f["certified_for"]]
    ax.plot([f["held_out_expected_speedup"] for f in tested], [f["agreement"] for f in tested], "o-", color="tab:blue",
            ms=5, label="tested (held-out rows)")
    measured = [f for f in tested if f.get("measured_speedup")]
    ax.scatter([f["measured_speedup"] for f in measured], [f["agreement"] for f in measured], marker="x",
               color="tab:orange", label="measured speed-up")
    if ok:
        ax.scatter([f["held_out_expected_speedup"] for f in ok], [f["agreement"] for f in ok], s=60, facecolors="none",
                   edgecolors="tab:green", label="certified for some quality")
    for f in frontier:
        if f["chosen"]:
            ax.scatter([f["held_out_expected_speedup"]], [f["agreement"]], marker="*", s=260, color="tab:red",
                       zorder=5, label=f"chosen (quality {budget['quality']})")
    ax.axhline(budget["quality"], color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("speed-up over the original (expected; x: measured)")
    ax.set_ylabel("agreement with the original")
    ax.set_title(f"quality budget: {' + '.join(budget['passes'])} (delta {budget['delta']})")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
