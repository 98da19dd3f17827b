"""adaptc::linear's GEMMs vs F.linear (ATen: MKL on x86), per shape, rows and dtype, one run.

    .venv/bin/python benchmarks/linear.py            # the shapes of MiniLM-L6, SmolLM2-135M and GPT-2
    .venv/bin/python benchmarks/linear.py --threads 2

Columns: F.linear (what nn.Linear calls), oneDNN on a prepacked weight, and the op as compile leaves it
untuned (its default heuristic). Each cell is the median of interleaved rounds; ratios are F.linear's
time over the other's (above 1: faster than nn.Linear). The default must never be below ~1.0x: it
keeps ATen where oneDNN loses. Results: benchmarks/results/linear-<device>.json / .md.
"""
from __future__ import annotations

import argparse
import statistics
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

from _results import device_name, write_results
from adaptc.kernels.linear import cpu

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # (K in, N out) of each model's linear layers
    "minilm": [(384, 384), (384, 1536), (1536, 384)],
    "smollm2": [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)],
    "gpt2": [(768, 2304), (768, 3072), (3072, 768)],
}
ROWS = (1, 2, 8, 64, 512)
DTYPES = (torch.float32, torch.bfloat16)


def seconds(fn, min_s: float) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - start < min_s:
        fn()
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in DTYPES:
        for model, shapes in SHAPES.items():
            for K, N in shapes:
                for M in ROWS:
                    g = torch.Generator().manual_seed(M * K + N)
                    x = torch.randn(M, K, generator=g).to(dtype)
                    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
                    b = torch.randn(N, generator=g).to(dtype)
                    default = cpu.cpu_default_config(x, w, b)["backend"]
                    calls = {"aten": lambda: F.linear(x, w, b),
                             "onednn": lambda: cpu.cpu_linear(x, w, b, config={"backend": "onednn"})}
                    torch.testing.assert_close(calls["onednn"]().float(), calls["aten"]().float(),
                                               **cpu_tolerance(dtype))
                    times = {k: [] for k in calls}
                    for r in range(args.rounds):
                        for k in (calls if r % 2 else reversed(list(calls))):
                            times[k].append(seconds(calls[k], args.min_seconds))
                    t = {k: statistics.median(v) for k, v in times.items()}
                    rows.append({"model": model, "dtype": str(dtype)[6:], "M": M, "K": K, "N": N,
                                 "aten_us": round(t["aten"] * 1e6, 1), "onednn_us": round(t["onednn"] * 1e6, 1),
                                 "onednn_speedup": round(t["aten"] / t["onednn"], 3), "default": default,
                                 "default_speedup": round(t["aten"] / t[default], 3)})
                    print(rows[-1], flush=True)
    dev = device_name("cpu")
    doc = {"device": dev, "torch": torch.__version__, "threads": args.threads, "date": str(date.today()),
           "args": vars(args), "rows": rows}
    write_results(RESULTS, "linear", dev, doc, markdown(doc))


def cpu_tolerance(dtype):
    from adaptc.kernels.linear.space import tolerance
    return tolerance(dtype)


def markdown(doc: dict) -> str:
    out = [f"# adaptc::linear vs F.linear on {doc['device']}", "",
           f"torch {doc['torch']}, {doc['threads']} thread(s), {doc['date']}; speedup = F.linear time / time "
           "(median of interleaved rounds). `default` is the backend the op picks untuned.", "",
           "| model | dtype | K x N | " + " | ".join(f"M={m} oneDNN / default" for m in ROWS) + " |",
           "|---|---|---|" + "---|" * len(ROWS)]
    keyed = {}
    for r in doc["rows"]:
        keyed.setdefault((r["model"], r["dtype"], r["K"], r["N"]), {})[r["M"]] = r
    for (model, dtype, K, N), by_m in keyed.items():
        cells = [f"{by_m[m]['onednn_speedup']:.2f}x / {by_m[m]['default_speedup']:.2f}x ({by_m[m]['default']})"
                 for m in ROWS]
        out.append(f"| {model} | {dtype} | {K} x {N} | " + " | ".join(cells) + " |")
    worst = min(doc["rows"], key=lambda r: r["default_speedup"])
    out += ["", f"Worst default: {worst['default_speedup']:.2f}x ({worst['model']} {worst['dtype']} M={worst['M']} "
            f"{worst['K']}x{worst['N']}, {worst['default']})."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
