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


def test_looped_graph_under_inference_mode_and_two_threads(albert):
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


def test_user_residual_loop_rerolls_in_fp32_and_bf16():
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Looped(n=5).eval().to(dtype)
        x = torch.randn(2, 7, 16, dtype=dtype)
        fast = adaptc.compile(model, example_inputs=(x,), tune=False, speed_check=False)
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
