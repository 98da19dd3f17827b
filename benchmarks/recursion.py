"""Recursion benchmark: ALBERT re-rolled into one ONNX Loop (exact), and relaxed recursion of distinct stacks.

    .venv/bin/python benchmarks/recursion.py                        # every part
    .venv/bin/python benchmarks/recursion.py --parts albert --models albert-tiny --exporters dynamo
    .venv/bin/python benchmarks/recursion.py --parts minilm lm      # relaxed recursion only

Part `albert` (exact):

ALBERT from its config with random weights (nothing downloaded): `albert-base` has albert-base-v2's shape
(12 layers sharing one group, width 768, 12 heads, vocabulary 30000), `albert-tiny` the tests' 4-layer one. Each export
is converted with the default passes (attention, moe, reroll) and without reroll; the table gives nodes
(top-level, and counting the Loop body), file size, the verified max relative error against the original
in onnxruntime, and onnxruntime CPU latency (batch 2, seq 16).

Parts `minilm` and `lm` (relaxed recursion, `passes=["recursion"]`, adaptc/runtime/recursion.py): N distinct blocks
become K shared blocks (cycle sharing) plus per-position low-rank deltas (whitened SVD on input-weighted shared
weights, as the pass does by default; plain SVD on averaged weights for comparison). For each K and rank:
parameters (the stack's and the whole model's, shared weights once, deltas counted), held-out agreement with the
original and throughput against the original in the same interleaved rounds.
- minilm: all-MiniLM-L6-v2 with a classification head fine-tuned as benchmarks/early_exit.py does (which corpus a
  passage comes from); class agreement, accuracy and the embedding's cosine on held-out passages, passages/s at
  batch 32; then the pass itself at quality 0.95 and 0.85: what it certifies on
  calibration text, and what that gives on held-out text. Target: >= 25% fewer parameters at >= 0.95 agreement.
- lm: SmolLM2-135M relaxed to K = 15, 10, 6: held-out next-token agreement (teacher forced), perplexity of the
  held-out text, greedy decode tokens/s.
Results: benchmarks/results/recursion-<device>.* (a part not run keeps its last results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptc.convert import convert  # noqa: E402
from tests.onnx.hf_exports import export_hf, export_model  # noqa: E402
from _results import device_name, slug, write_results  # noqa: E402
import _relaxed  # noqa: E402  (the relaxed-recursion parts)

RESULTS = Path(__file__).parent / "results"
PARTS = ("albert", "minilm", "lm")


def albert(name: str, exporter: str, work: Path) -> Path:
    if name == "albert-tiny":
        return export_hf("albert", exporter, work)
    import torch
    import transformers as tf

    torch.manual_seed(0)
    # albert-base-v2's shape (AlbertConfig()'s own defaults are xxlarge: width 4096, 64 heads)
    config = tf.AlbertConfig(embedding_size=128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, attn_implementation="sdpa")
    model = tf.AlbertModel(config).eval()
    return export_model(model, exporter, work / f"albert-base-{exporter}.onnx")


def part_albert(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models.split(","):
            for exporter in args.exporters.split(","):
                src = albert(name, exporter, work)
                for label, passes in (("attention,moe", ["attention", "moe"]), ("+reroll", None)):
                    dst = work / f"{src.stem}-{label.replace(',', '-').replace('+', '')}.onnx"
                    report = convert(src, dst, passes=passes)
                    reroll = next((f for f in report["fusions"] if f["rule"] == "reroll"), None)
                    rows.append({"model": name, "exporter": exporter, "passes": label,
                                 "nodes_before": report["nodes"]["before"], "nodes_after": report["nodes"]["after"],
                                 "nodes_with_loop_body": report["nodes"]["after_with_subgraphs"],
                                 "bytes_before": src.stat().st_size, "bytes_after": dst.stat().st_size,
                                 "loop_blocks": (reroll or {}).get("details", {}).get("blocks", 0),
                                 "max_rel": report["verification"]["worst"]["max_rel"],
                                 "ms_original": report["latency_ms"]["before"],
                                 "ms_converted": report["latency_ms"]["after"]})
                    print(rows[-1], flush=True)
    return rows


def albert_markdown(rows: list[dict], device: str) -> list[str]:
    lines = [f"# ALBERT re-rolled into one ONNX Loop ({device})", "",
             "| model | exporter | passes | nodes before | nodes after (with Loop body) | MB before | MB after "
             "| Loop blocks | max rel err | ms original | ms converted |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['model']} | {r['exporter']} | {r['passes']} | {r['nodes_before']} | {r['nodes_after']} "
                     f"({r['nodes_with_loop_body']}) | {r['bytes_before'] / 1e6:.2f} | {r['bytes_after'] / 1e6:.2f} "
                     f"| {r['loop_blocks']} | {r['max_rel']:.1e} | {r['ms_original']:.2f} | {r['ms_converted']:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--models", default="albert-tiny,albert-base")
    parser.add_argument("--exporters", default="dynamo,torchscript")
    parser.add_argument("--out", type=Path, default=RESULTS)
    _relaxed.add_arguments(parser)
    args = parser.parse_args()
    device = device_name("cpu")
    doc = {"device": device, "rows": []}
    previous = args.out / f"recursion-{slug(device)}.json"
    if previous.exists():  # the parts not run keep their last results on this device
        doc.update({k: v for k, v in json.loads(previous.read_text()).items() if k in ("rows", *PARTS[1:])})
    if "albert" in args.parts:
        doc["rows"] = part_albert(args)
    if "minilm" in args.parts:
        doc["minilm"] = _relaxed.part_minilm(args)
    if "lm" in args.parts:
        doc["lm"] = _relaxed.part_lm(args)
    lines = albert_markdown(doc["rows"], device) + _relaxed.markdown(doc)
    doc["date"] = str(datetime.date.today())
    write_results(args.out, "recursion", device, doc, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
