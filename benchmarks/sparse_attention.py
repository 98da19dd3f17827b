"""Approximate sparse attention on SmolLM2-135M: quality vs speed on held-out real text.

    .venv/bin/python benchmarks/sparse_attention.py
    .venv/bin/python benchmarks/sparse_attention.py --qualities 0.95 --length 512

For each quality target, `adaptc.compile(passes=["sparse_attention"], quality=q)` calibrates per-head
patterns on calibration-split text (Python docs, fortunes, KJV); then, on held-out text the
calibration never saw, against the original model in the same run: next-token agreement, perplexity,
the share of causal key blocks read, and prefill time at the calibration length and at twice it.
Results: benchmarks/results/sparse_attention-<device>.json/.md (+ .png, speed vs agreement).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import adaptc
from adaptc.calibrate.attention_sparsity import density, next_token_quality
from adaptc.calibrate.text import passages
from adaptc.capture.inputs import Inputs
from adaptc.tuner.timing import median_seconds
from _models import smollm2
from _results import device_name, pyplot, slug, write_results


def chunks(tok, split: str, count: int, length: int) -> list[torch.Tensor]:
    text = "\n\n".join(p.text for p in passages(split, 40 * count * length // 256))
    ids = tok(text, return_tensors="pt").input_ids[0]
    if ids.numel() < count * length:
        raise SystemExit(f"not enough {split} text for {count} x {length} tokens")
    return [ids[i * length:(i + 1) * length][None] for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qualities", type=float, nargs="+", default=[0.99, 0.95, 0.9])
    ap.add_argument("--length", type=int, default=1024, help="tokens per calibration / evaluation sequence")
    ap.add_argument("--batches", type=int, default=4, help="calibration sequences (half fit, half check)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, tok = smollm2()
    calibration = [(c,) for c in chunks(tok, "calibration", args.batches, args.length)]
    heldout = [Inputs.of((c,)) for c in chunks(tok, "heldout", 4, args.length)]
    with torch.no_grad():
        reference = [model(*b.args).logits for b in heldout]
    long_ids = torch.cat([b.args[0] for b in heldout[:2]], dim=1)  # 2x the calibration length
    timing_inputs = {args.length: heldout[0].args[0], 2 * args.length: long_ids}
    doc = {"benchmark": "sparse_attention", "device": "cpu", "device_name": device_name("cpu"),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)",
           "length": args.length, "heldout_tokens": sum(b.args[0].numel() for b in heldout), "rows": []}
    with torch.no_grad():
        original_ms = {L: median_seconds(lambda x=x: model(x), "cpu", seconds=args.seconds, min_runs=3) * 1e3
                       for L, x in timing_inputs.items()}
    doc["original_ms"] = original_ms
    for q in args.qualities:
        t0 = time.perf_counter()
        fast = adaptc.compile(model, example_inputs=calibration[0], passes=["sparse_attention"],
                              calibration=calibration, quality=q)
        compile_s = time.perf_counter() - t0
        result = adaptc.report(fast)["passes"][0]
        row = {"quality_target": q, "status": result["status"], "reason": result["reason"], "compile_s": compile_s,
               "tau": result["details"].get("tau")}
        if result["status"] == "applied":
            plan = {p: fast.get_submodule(p).adaptc_sparse_pattern for p in result["sites"]}
            with torch.no_grad():
                row.update(next_token_quality(fast, reference, heldout))
                row["ms"] = {L: median_seconds(lambda x=x: fast(x), "cpu", seconds=args.seconds, min_runs=3) * 1e3
                             for L, x in timing_inputs.items()}
            row["density"] = {L: density(plan, L) for L in timing_inputs}
            row["speedup"] = {L: original_ms[L] / row["ms"][L] for L in timing_inputs}
            row["dense_heads"] = result["details"]["dense_heads"]
        doc["rows"].append(row)
        print(row, file=sys.stderr)
    write_results(args.out, "sparse_attention", doc["device_name"], doc, markdown(doc))
    plot(doc, args.out / f"sparse_attention-{slug(doc['device_name'])}.png")


def markdown(doc: dict) -> str:
    L = doc["length"]
    out = [f"# Approximate sparse attention on {doc['model']} — {doc['device_name']}", "",
           f"{doc['date']}, torch {doc['torch']}. Calibrated on calibration-split text ({L}-token sequences), measured "
           f"on {doc['heldout_tokens']} held-out tokens. Original prefill: "
           + ", ".join(f"{ms:.0f} ms at {n}" for n, ms in doc["original_ms"].items()) + ".", "",
           f"| quality target | status | next-token agreement | perplexity (original) | heads kept dense | "
           f"density at {L} / {2 * L} | prefill speedup at {L} / {2 * L} | compile s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r["status"] != "applied":
            out.append(f"| {r['quality_target']} | {r['status']}: {r['reason']} | | | | | | {r['compile_s']:.0f} |")
            continue
        d, s = list(r["density"].values()), list(r["speedup"].values())
        out.append(f"| {r['quality_target']} | applied (tau {r['tau']}) | {r['agreement']:.4f} | {r['perplexity']:.2f} "
                   f"({r['perplexity_original']:.2f}) | {r['dense_heads']} | {d[0]:.2f} / {d[1]:.2f} | "
                   f"{s[0]:.2f}x / {s[1]:.2f}x | {r['compile_s']:.0f} |")
    return "\n".join(out) + "\n"


def plot(doc: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in doc["rows"] if r["status"] == "applied"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for L in doc["original_ms"]:
        ax.plot([r["agreement"] for r in rows], [r["speedup"][L] for r in rows], "o-", label=f"prefill {L} tokens")
    for r in rows:
        ax.annotate(f"q={r['quality_target']}", (r["agreement"], list(r["speedup"].values())[0]), fontsize=7)
    ax.set_xlabel("held-out next-token agreement"), ax.set_ylabel("speedup vs original")
    ax.set_title("SmolLM2-135M, approximate sparse attention", fontsize=9), ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout(), fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
