"""Exit-confidence benchmark: the confidence of a 49K-vocabulary LM head, plain torch vs adaptc — one run.

    .venv/bin/python benchmarks/exit_confidence.py              # N = 1, 8, 64 rows
    .venv/bin/python benchmarks/exit_confidence.py --rows 1 256 --seconds 2

SmolLM2-135M's head shape (V = 49152, D = 576, no bias), random weights (speed does not depend on the
values). Baselines, all in this run and on the same inputs:
- `torch`: what an exit runs without adaptc — logits = F.linear, softmax, topk(2): max prob, margin, top-1;
- `matmul only`: F.linear alone, the floor any exit confidence pays for reading the weight.
adaptc runs `adaptc::exit_confidence` (CPU: vocabulary-chunked matmuls with an online softmax/top-2
reduction; GPU: the split-vocabulary Triton kernel) with its default config and after tuning. Every
variant is checked against the reference before it is timed. CPU inputs are fp32; GPU inputs bf16 (the
torch baseline then computes bf16 logits and softmaxes them in fp32, as a bf16 model does).
Results: benchmarks/results/exit_confidence-<device>.json/.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from adaptc.cache import default_cache, open_cache
from adaptc.kernels import KERNELS
from adaptc.kernels.exit_confidence import space, torch_exit_confidence
from adaptc.kernels.exit_confidence.op import exit_confidence
from adaptc.tuner.session import install_cache_source, tune_calls
from adaptc.tuner.timing import interleaved_ms
from adaptc.tuner.tune import Budget
from _results import device_name, write_results

V, D = 49152, 576  # SmolLM2-135M's vocabulary and width


def plain_confidence(h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    probs = F.linear(h, w).float().softmax(-1)
    top = probs.topk(2, dim=-1)
    return top.values[:, 0], top.values[:, 0] - top.values[:, 1], top.indices[:, 0]


def bench(N: int, device: str, dtype: torch.dtype, seconds: float, tune_trials: int, cache) -> dict:
    h, w, _ = space.make_inputs(N, V, D, dtype=dtype, device=device, bias=False, seed=N, spread=4.0)
    impl = "triton" if device == "cuda" else "cpu"
    kernel = KERNELS["exit_confidence"]
    default = kernel.implementations[impl].space.default(h, w, None)
    row = {"N": N, "ms": {}, "ok": {}, "config": {"default": default},
           "logits_mb_avoided": 2 * 4 * N * V / 2 ** 20}  # the fp32 logits and probabilities, written and read
    tuned = tune_calls(lambda: exit_confidence(h, w), Budget(trials=tune_trials, seconds=60, seconds_per_trial=0.3),
                       cache=cache)
    row["config"]["tuned"] = tuned["kernels"][0]["config"] if tuned["kernels"] else None
    impl_fn = kernel.implementations[impl].fn
    variants = {"torch": lambda: plain_confidence(h, w), "matmul only": lambda: F.linear(h, w),
                "adaptc default": lambda: impl_fn(h, w, None, config=default),
                "adaptc tuned": lambda: exit_confidence(h, w)}  # the op, with the config tuning installed
    want = torch_exit_confidence(h, w)
    tol = space.tolerance(dtype)
    for name, fn in variants.items():
        if name != "matmul only" and (name != "torch" or dtype == torch.float32):
            row["ok"][name] = kernel.matches(fn(), want, tol)
    row["ms"], row["ms_rounds"] = interleaved_ms(variants, device, seconds=seconds)
    ms = row["ms"]
    best = min(ms["adaptc default"], ms["adaptc tuned"])
    row["speedup_vs_torch"] = ms["torch"] / best
    row["vs_matmul_floor"] = ms["matmul only"] / best
    if device == "cuda":  # how close to streaming the weight once at the GPU's memory bandwidth
        row["weight_gbps"] = w.numel() * w.element_size() / (best / 1e3) / 1e9
    print(f"N={N:4d} " + "  ".join(f"{k} {v:8.3f}ms" for k, v in ms.items())
          + f"  | adaptc vs torch {row['speedup_vs_torch']:.2f}x", file=sys.stderr)
    return row


def markdown(doc: dict) -> str:
    out = [f"# Exit-confidence benchmark — {doc['device_name']}", "",
           f"{doc['date']}, torch {doc['torch']}, {doc['dtype']}"
           + (f", {doc['threads']} CPU thread(s)" if doc.get("threads") else "") + f", LM head V={V} x D={D} (SmolLM2-135M), no bias; "
           "median ms per call. `torch` = F.linear + softmax + topk(2); `matmul only` = F.linear alone (the floor).", "",
           "| N | torch | matmul only | adaptc default | adaptc tuned | adaptc vs torch | adaptc vs matmul | "
           "logits MB not written | tuned config |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        ms = r["ms"]
        out.append(f"| {r['N']} | {ms['torch']:.3f} | {ms['matmul only']:.3f} | {ms['adaptc default']:.3f} | "
                   f"{ms['adaptc tuned']:.3f} | {r['speedup_vs_torch']:.2f}x | {r['vs_matmul_floor']:.2f}x | "
                   f"{r['logits_mb_avoided']:.1f} | `{r['config']['tuned']}` |")
    bad = [(r["N"], k) for r in doc["rows"] for k, ok in r["ok"].items() if ok is False]
    out += ["", "Every adaptc variant agreed with the fp32 reference (max prob, margin; top-1 outside near-ties)."
            if not bad else f"DISAGREED with the reference: {bad}"]
    return "\n".join(out) + "\n"


def main() -> None:
    install_cache_source()  # the kernels read what tune_calls measures from the tuning cache
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--tune-trials", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's). 1 gives steadier numbers on a shared machine, "
                         "where every parallel region of the chunked loop waits for a descheduled thread.")
    ap.add_argument("--use-cache", action="store_true", help="take tuned configs from the user's tuning cache")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    doc = {"benchmark": "exit_confidence", "device": device, "device_name": device_name(device),
           "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "date": time.strftime("%Y-%m-%d"),
           "V": V, "D": D, "threads": torch.get_num_threads() if device == "cpu" else None, "rows": []}
    # Tuned in this run (a private cache) unless told to use the shared one.
    cache = default_cache() if args.use_cache else open_cache(directory=tempfile.mkdtemp(prefix="adaptc-bench-"))
    with torch.no_grad():
        for N in args.rows:
            doc["rows"].append(bench(N, device, dtype, args.seconds, args.tune_trials, cache))
    write_results(args.out, "exit_confidence", doc["device_name"], doc, markdown(doc))


if __name__ == "__main__":
    main()
