"""Attention benchmark: dense SDPA (what Hugging Face runs), FlexAttention, adaptc — one run.

    .venv/bin/python benchmarks/attention.py                 # CPU: 1K-8K tokens; GPU: 1K-16K
    .venv/bin/python benchmarks/attention.py --lengths 1024 2048 --no-flex

Llama-like heads (8 query heads over 2 KV heads, head dim 64), batch 1; masks: causal, and causal
with a sliding window of 256 and of 1024. Baselines, all in this run: SDPA as Hugging Face calls it
(is_causal=True for plain causal, the dense boolean mask for windows), and FlexAttention compiled
with the same block mask (its compile time is reported apart). adaptc runs `adaptc::attention`
with the structure the attention pass recovers from the mask; its own overhead — recovering that
structure from Hugging Face's dense mask, once per forward — is reported apart. Every variant is
checked against SDPA before it is timed. Results: benchmarks/results/attention-<device>.json/.md.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import adaptc.kernels  # noqa: F401  (registers adaptc::attention)
from adaptc.calibrate.attention_sparsity import HeadPattern, density
from adaptc.kernels.attention.reference import dense_mask
from adaptc.passes.attention_fusion import explain_mask
from adaptc.tuner.session import install_cache_source, tune_calls
from adaptc.tuner.timing import median_seconds
from adaptc.tuner.tune import Budget
from _results import device_name, write_results

HQ, HKV, D = 8, 2, 64
PATTERNS = {"causal": 0, "window256": 256, "window1024": 1024}
# adaptc approximate (causal rows): every head reads 1 sink + 4 local + 4 top-scoring blocks of 64 keys — a
# typical calibrated pattern; what it costs the model's quality is measured in benchmarks/sparse_attention.py.
APPROX = dict(block=64, sinks=1, window=4, topk=4)


def flex_variant(L: int, window: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q, k):
        ok = k <= q
        return ok & (q - k < window) if window else ok

    torch._dynamo.reset()  # a fresh compile per shape and mask, not a recompile against dynamo's limit
    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, L, L, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return (lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)), t0


def bench(L: int, pattern: str, device: str, dtype: torch.dtype, seconds: float, flex: bool) -> dict:
    window = PATTERNS[pattern]
    g = torch.Generator().manual_seed(L)
    q = torch.randn(1, HQ, L, D, generator=g).to(device, dtype)
    k = torch.randn(1, HKV, L, D, generator=g).to(device, dtype)
    v = torch.randn(1, HKV, L, D, generator=g).to(device, dtype)
    scale = D ** -0.5
    hf_mask = dense_mask(1, L, L, True, window, 0, None, None, device) if window else None
    variants = {
        "sdpa": (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=hf_mask, is_causal=hf_mask is None,
                                                        scale=scale, enable_gqa=True)),
        "adaptc": (lambda: torch.ops.adaptc.attention(q, k, v, None, None, scale, True, window, 0)),
    }
    if not window:
        a = APPROX
        variants["adaptc_approx"] = (lambda: torch.ops.adaptc.sparse_attention(
            q, k, v, scale, 0, a["block"], [a["sinks"]] * HQ, [a["window"]] * HQ, [a["topk"]] * HQ))
    row = {"length": L, "pattern": pattern, "density": None, "ms": {}, "max_abs_err": {}, "notes": {}}
    visible = dense_mask(1, L, L, True, window, 0, None, None, "cpu")
    row["density"] = float(visible.float().mean())
    # adaptc's overhead: the structure of HF's dense mask, recovered once per forward (all layers share it).
    mask_for_analysis = hf_mask if hf_mask is not None else visible.to(device)
    t0 = time.perf_counter()
    explain_mask(mask_for_analysis, L, L, True, window)
    row["notes"]["adaptc_mask_analysis_ms"] = (time.perf_counter() - t0) * 1e3
    tuned = tune_calls(variants["adaptc"], Budget(trials=8, seconds=60, seconds_per_trial=0.2))["kernels"]
    row["notes"]["adaptc_config"] = tuned[0]["config"] if tuned else None
    if flex:
        try:
            flex_fn, t0 = flex_variant(L, window, device)
            flex_fn(q, k, v)
            row["notes"]["flex_compile_s"] = time.perf_counter() - t0
            variants["flex_attention"] = lambda: flex_fn(q, k, v)
        except Exception as e:  # FlexAttention's CPU path needs a C++ toolchain and a recent torch
            row["notes"]["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    want = variants["sdpa"]().float()
    for name, fn in variants.items():
        got = fn().float()
        row["max_abs_err"][name] = (got - want).abs().max().item()
        row["ms"][name] = median_seconds(fn, device, seconds=seconds, min_runs=3) * 1e3
    ms = row["ms"]
    row["adaptc_vs_sdpa"] = ms["sdpa"] / ms["adaptc"]
    if "flex_attention" in ms:
        row["adaptc_vs_flex"] = ms["flex_attention"] / ms["adaptc"]
    if "adaptc_approx" in ms:
        a = APPROX
        heads = HeadPattern(a["block"], (a["sinks"],), (a["window"],), (a["topk"],))
        row["notes"]["approx_density"] = density({"": heads}, L) * row["density"]
        row["approx_vs_sdpa"] = ms["sdpa"] / ms["adaptc_approx"]
    print(f"L={L:5d} {pattern:10s} density {row['density']:.3f}  " + "  ".join(f"{k} {v:9.2f}ms" for k, v in ms.items())
          + f"  | adaptc vs sdpa {row['adaptc_vs_sdpa']:.2f}x", file=sys.stderr)
    return row


def markdown(doc: dict) -> str:
    out = [f"# Attention benchmark — {doc['device_name']}", "",
           f"{doc['date']}, torch {doc['torch']}, {doc['dtype']}, batch 1, {HQ} query / {HKV} KV heads, head dim {D}; "
           "median ms per call.", "",
           "| length | mask | density | SDPA (HF) | FlexAttention | adaptc | adaptc vs SDPA | adaptc vs Flex | mask analysis ms | Flex compile s | adaptc approx (density) | approx vs SDPA |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        ms, n = r["ms"], r["notes"]
        flex = f"{ms['flex_attention']:.2f}" if "flex_attention" in ms else "n/a"
        vs_flex = f"{r['adaptc_vs_flex']:.2f}x" if "adaptc_vs_flex" in r else "n/a"
        compile_s = f"{n['flex_compile_s']:.1f}" if "flex_compile_s" in n else "n/a"
        approx = (f"{ms['adaptc_approx']:.2f} ({n['approx_density']:.3f}) | {r['approx_vs_sdpa']:.2f}x"
                  if "adaptc_approx" in ms else "n/a | n/a")
        out.append(f"| {r['length']} | {r['pattern']} | {r['density']:.3f} | {ms['sdpa']:.2f} | {flex} | {ms['adaptc']:.2f} | "
                   f"{r['adaptc_vs_sdpa']:.2f}x | {vs_flex} | {n['adaptc_mask_analysis_ms']:.1f} | {compile_s} | {approx} |")
    errors = {r["notes"].get("flex_error") for r in doc["rows"]} - {None}
    if errors:
        out += ["", "FlexAttention failed here: " + "; ".join(sorted(errors))]
    target = [r for r in doc["rows"] if r["length"] == 8192 and r["pattern"] == "window256"]
    if target:
        r = target[0]
        out += ["", f"Target (8K tokens, window 256, CPU): >= 12x dense SDPA -> {r['adaptc_vs_sdpa']:.1f}x "
                f"({'met' if r['adaptc_vs_sdpa'] >= 12 else 'MISSED'}); the density limit is {1 / r['density']:.1f}x."]
    out += ["", f"adaptc approx: `adaptc::sparse_attention` with {APPROX} per head (random inputs: speed only; "
            "its quality on a real model is in sparse_attention-<device>.md)."]
    return "\n".join(out) + "\n"


def main() -> None:
    install_cache_source()  # the kernels read what tune_calls measures from the tuning cache
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--lengths", type=int, nargs="+",
                    default=[1024, 2048, 4096, 8192] + ([16384] if device == "cuda" else []))
    ap.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baseline")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    doc = {"benchmark": "attention", "device": device, "device_name": device_name(device), "torch": torch.__version__,
           "dtype": str(dtype).removeprefix("torch."), "date": time.strftime("%Y-%m-%d"), "rows": []}
    with torch.no_grad():  # inference, as in a compiled model: and one grad mode, so no recompiles
        for L in args.lengths:
            for pattern in args.patterns:
                doc["rows"].append(bench(L, pattern, device, dtype, args.seconds, not args.no_flex))
    write_results(args.out, "attention", doc["device_name"], doc, markdown(doc))


if __name__ == "__main__":
    main()
