"""Recursion benchmark, exact part: ALBERT's weight-shared layers re-rolled into one ONNX Loop by `adaptc convert`.

    .venv/bin/python benchmarks/recursion.py                        # albert-tiny and albert-base, both exporters
    .venv/bin/python benchmarks/recursion.py --models albert-tiny --exporters dynamo

ALBERT from its config with random weights (nothing downloaded): `albert-base` has albert-base-v2's shape
(12 layers sharing one group, width 768, 12 heads, vocabulary 30000), `albert-tiny` the tests' 4-layer one. Each export
is converted with the default passes (attention, moe, reroll) and without reroll; the table gives nodes
(top-level, and counting the Loop body), file size, the verified max relative error against the original
in onnxruntime, and onnxruntime CPU latency (batch 2, seq 16). Results: benchmarks/results/recursion-<device>.*
"""
from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptc.convert import convert  # noqa: E402
from tests.onnx.hf_exports import export_hf, export_model  # noqa: E402
from _results import device_name, write_results  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="albert-tiny,albert-base")
    parser.add_argument("--exporters", default="dynamo,torchscript")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
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
    device = device_name("cpu")
    lines = [f"# ALBERT re-rolled into one ONNX Loop ({device}, {datetime.date.today()})", "",
             "| model | exporter | passes | nodes before | nodes after (with Loop body) | MB before | MB after "
             "| Loop blocks | max rel err | ms original | ms converted |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['model']} | {r['exporter']} | {r['passes']} | {r['nodes_before']} | {r['nodes_after']} "
                     f"({r['nodes_with_loop_body']}) | {r['bytes_before'] / 1e6:.2f} | {r['bytes_after'] / 1e6:.2f} "
                     f"| {r['loop_blocks']} | {r['max_rel']:.1e} | {r['ms_original']:.2f} | {r['ms_converted']:.2f} |")
    write_results(args.out, "recursion", device, {"device": device, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
