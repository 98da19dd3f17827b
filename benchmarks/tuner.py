"""Tuner benchmark: how many measurements each search strategy needs, replayed from recorded tables.

    .venv/bin/python benchmarks/tuner.py --record          # time every config on this device first
    .venv/bin/python benchmarks/tuner.py                   # replay every table in benchmarks/results/

A replay table holds the time of every config of a kernel's space for a set of problems (recorded
once, on the device it names, in interleaved rounds: on a shared machine a burst of load then slows
every config alike instead of making a few look slow). For each problem held out in turn, the cost
model trains on the other problems' tables; then random search, plain TPE and cost model + TPE each
search the held-out problem against the table, over several seeds. The figure: measurements until a
config within 5% of the exhaustive best is found. Then, with compile's default budget (where cost
model + TPE also prunes the half of the space its model ranks slowest), how close each pick comes to
the best. Also: the cost model's rank quality on held-out problems, and `adaptc.compile` cold (empty
tuning cache) vs warm.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from adaptc.kernels import KERNELS
from adaptc.tuner.cost_model import CostModel, evaluate
from adaptc.tuner.device import DeviceFingerprint
from adaptc.tuner.replay import (as_records, best_time, load_table, measurements_to_near_best, record_table,
                                 replay_measure)
from adaptc.tuner.tune import Budget, best_trial, canonical, model_plan, search
from _results import slug, write_results

RESULTS = Path(__file__).parent / "results"
STRATEGIES = ("random", "tpe", "model+tpe")
WITHIN = 1.05
COMPILE_BUDGET = Budget()  # what `adaptc.compile` measures per problem by default
# CPU grid for the fused_moe CPU implementation: Mixtral-like and Qwen-like widths and a Qwen-like
# shared expert (one expert every token picks), decode to prefill.
CPU_GRID = [dict(H=H, I=I, E=E, K=K) for H, I, E, K in
            [(512, 1792, 8, 2), (1024, 512, 60, 4), (768, 384, 32, 4), (1024, 3584, 8, 2), (1024, 2048, 1, 1)]]
CPU_TOKENS = (1, 8, 32, 128, 512)


def record(kernel: str, impl: str, device: str) -> Path:
    k = KERNELS[kernel]
    problems = [{**p, "T": t, "dtype": "float32" if device == "cpu" else "bfloat16", "gated": True}
                for p in CPU_GRID for t in CPU_TOKENS]
    args = (k.example(p, device) for p in problems)
    table = record_table(kernel, impl, args, Budget(seconds_per_trial=0.5), rounds=5,
                         on_problem=lambda i: print(f"  recorded {i + 1}/{len(problems)}", file=sys.stderr))
    path = RESULTS / f"replay-{kernel}-{impl}-{slug(table['device']['name'])}.json"
    path.write_text(json.dumps(table, indent=1))
    return path


def replay(table: dict, seeds: int) -> dict:
    kernel, impl = table["kernel"], table["implementation"]
    k = KERNELS[kernel]
    space = k.implementations[impl].space
    records = as_records(table)
    units = DeviceFingerprint.from_dict(table["device"]).units
    # With compile's budget the model prunes; "model+tpe unpruned" shows what pruning changes.
    results, picks = {s: [] for s in STRATEGIES}, {s: [] for s in (*STRATEGIES, "model+tpe unpruned")}
    qualities = []
    for i, entry in enumerate(table["problems"]):
        args = k.example(entry["problem"], "cpu")  # only shapes and dtype matter to the space
        recorded = {canonical(t["config"]) for t in entry["trials"]}
        candidates = [c for c in space.configs(*args) if canonical(c) in recorded]
        model = CostModel.train(kernel, impl, records[:i] + records[i + 1:], units=units)
        if model is not None:
            qualities.append(evaluate(model, [records[i]]))
        best = best_time(entry)
        for budget, out in ((Budget(trials=len(candidates), seconds=1e9), results), (COMPILE_BUDGET, picks)):
            ranked, visit = model_plan(model, kernel, impl, entry["problem"], space.default(*args), candidates, budget)
            for variant in out:
                strategy = variant.split()[0]
                for seed in range(seeds):
                    trials = search(space, visit if variant == "model+tpe" else candidates, replay_measure(entry),
                                    budget, strategy=strategy, ranked=ranked, seed=seed)
                    pick = best_trial(trials)
                    out[variant].append((measurements_to_near_best(trials, best, WITHIN), len(candidates),
                                         pick.time_s / best if pick else math.inf))
    summary = {s: {"mean_fraction_of_space": statistics.mean(n / size for n, size, _ in v),
                   "max_fraction_of_space": max(n / size for n, size, _ in v),
                   "mean_measurements": statistics.mean(n for n, _, _ in v)} for s, v in results.items()}
    # What compile gets: its default budget, then the pick's time over the best's.
    compile_budget = {s: {"pick_vs_best_geomean": statistics.geometric_mean(r for _, _, r in v),
                          "pick_vs_best_worst": max(r for _, _, r in v),
                          "picks_within": sum(r <= WITHIN for _, _, r in v) / len(v)} for s, v in picks.items()}
    q = [x for x in qualities if x.get("problems")]
    quality = {m: statistics.mean(x[m] for x in q) for m in ("spearman", "top1", "top5")} if q else {}
    return {"kernel": kernel, "implementation": impl, "device": table["device"]["name"],
            "space_sizes": sorted({len(entry["trials"]) for entry in table["problems"]}),
            "problems": len(table["problems"]), "seeds": seeds, "strategies": summary, "compile_budget": compile_budget,
            "cost_model": quality}


def compile_cold_vs_warm() -> dict:
    sys.path.insert(0, str(Path(__file__).parent.parent))
    import adaptc
    from adaptc.cache import reset_default_cache
    from tests.moe_models import hf_causal_lm

    model = hf_causal_lm("mixtral")
    ids = torch.randint(3, 96, (2, 32))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        os.environ["ADAPTC_CACHE_DIR"] = d
        reset_default_cache()
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            fast = adaptc.compile(model, example_inputs=(ids,))
            tuning = adaptc.report(fast)["tuning"]
            out[label] = {"seconds": time.perf_counter() - t0, "measured": tuning["measured"], "cache_hits": tuning["cache_hits"]}
    reset_default_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", action="store_true", help="record a replay table for this device's implementation first")
    ap.add_argument("--tables", nargs="*", type=Path, default=None, help="default: benchmarks/results/replay-*.json")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.record:
        print(f"recorded {record('fused_moe', 'triton' if device == 'cuda' else 'cpu', device)}", file=sys.stderr)
    tables = args.tables if args.tables is not None else sorted(RESULTS.glob("replay-*.json"))
    doc = {"benchmark": "tuner", "date": time.strftime("%Y-%m-%d"), "within": WITHIN,
           "replays": [replay(load_table(p), args.seeds) for p in tables], "compile": compile_cold_vs_warm()}
    lines = [f"# Tuner benchmark ({doc['date']})", "",
             "Measurements to reach a config within 5% of the exhaustive best, as a fraction of the space "
             "(mean over held-out problems and seeds; lower is better).", ""]
    for r in doc["replays"]:
        lines.append(f"## {r['kernel']}/{r['implementation']} on {r['device']} "
                     f"({r['problems']} problems, {r['space_sizes'][0]}-{r['space_sizes'][-1]} configs each)")
        lines += ["", "| strategy | mean | worst | measurements (mean) |", "|---|---|---|---|"]
        lines += [f"| {s} | {v['mean_fraction_of_space']:.1%} | {v['max_fraction_of_space']:.1%} | {v['mean_measurements']:.1f} |"
                  for s, v in r["strategies"].items()]
        lines += ["", f"With compile's default budget ({COMPILE_BUDGET.trials} measurements; cost model + TPE then "
                  "also prunes the half of the space its model ranks slowest): the pick's time over the best's.", "",
                  "| strategy | geometric mean | worst | picks within 5% |", "|---|---|---|---|"]
        lines += [f"| {s} | {v['pick_vs_best_geomean']:.3f}x | {v['pick_vs_best_worst']:.2f}x | {v['picks_within']:.0%} |"
                  for s, v in r["compile_budget"].items()]
        if r["cost_model"]:
            q = r["cost_model"]
            lines += ["", f"Cost model on held-out problems: Spearman {q['spearman']:.2f}, top-1 {q['top1']:.0%}, top-5 {q['top5']:.0%}"]
        lines.append("")
    c = doc["compile"]
    lines.append(f"`adaptc.compile` (tiny Mixtral): cold {c['cold']['seconds']:.2f}s ({c['cold']['measured']} measured), "
                 f"warm {c['warm']['seconds']:.2f}s ({c['warm']['measured']} measured, {c['warm']['cache_hits']} cache hits)")
    write_results(RESULTS, "tuner", doc["replays"][0]["device"] if doc["replays"] else device, doc,
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
