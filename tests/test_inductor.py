"""Dense code through Inductor: compile hands what the passes emit to torch.compile, verified like a
pass; where torch.compile cannot run the model stays eager and the report says why.

Inductor is off by default (compiling takes seconds a model): these tests pass inductor=True.
"""
from __future__ import annotations

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import adaptc


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def fast(llama):
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    return adaptc.compile(llama, example_inputs=(ids,), tune=False, inductor=True)


def greedy(model, ids, n=6):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False)


def test_generate_through_inductor_matches_the_original(llama, fast):
    info = adaptc.report(fast)["inductor"]
    assert info["enabled"] and info["compiled"] == ["forward"] and info["reason"] == ""
    assert info["seconds"] > 0
    for ids in (torch.tensor([[5, 6, 7, 8]]), torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))):
        assert torch.equal(greedy(fast, ids), greedy(llama, ids))


def test_inductor_false_leaves_the_model_eager(llama):
    ids = torch.randint(0, 128, (2, 8))
    plain = adaptc.compile(llama, example_inputs=(ids,), tune=False, inductor=False)
    assert adaptc.report(plain)["inductor"] == {"enabled": False}
    assert "forward" not in plain.__dict__


def test_a_model_inductor_cannot_compile_stays_eager_with_the_reason(llama, monkeypatch):
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("inductor could not lower this graph\n(more lines)")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    ids = torch.randint(0, 128, (2, 8))
    eager = adaptc.compile(llama, example_inputs=(ids,), tune=False, inductor=True)
    info = adaptc.report(eager)["inductor"]
    assert info["compiled"] == []
    assert info["reason"] == "stays eager: RuntimeError: inductor could not lower this graph"
    assert "forward" not in eager.__dict__
    assert torch.equal(greedy(eager, ids[:1]), greedy(llama, ids[:1]))


def test_serving_contexts_and_two_threads(llama, fast):
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = llama(ids).logits.detach()
    with torch.inference_mode():
        assert torch.allclose(fast(ids).logits, want, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(fast(ids).logits, want, atol=1e-4)
    inputs = [torch.randint(0, 128, (1 + i % 2, 6), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [greedy(llama, x, 4) for x in inputs]
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def serve(k: int) -> None:
        try:
            for i in range(k, len(inputs), 2):
                got[i] = greedy(fast, inputs[i], 4)
        except BaseException as exc:  # surfaced below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(got[i], expected[i]) for i in range(len(inputs)))


def test_an_exported_graph_through_inductor_matches_the_original():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    fast = adaptc.compile(model, example_inputs={"input_ids": ids, "attention_mask": mask}, tune=False, inductor=True)
    rep = adaptc.report(fast)
    assert rep["capture"]["granularity"] == "graph"
    assert rep["inductor"]["compiled"] == ["graph"], rep["inductor"]
    other = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got, want = fast(input_ids=other, attention_mask=torch.ones_like(other)).logits, model(input_ids=other).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_gated_blocks_compile_their_dense_parts_and_keep_the_policies(llama):
    """With a StackController on the stack (policies decide in Python between blocks), the blocks'
    MLPs and norms and the final norm + head are compiled; the attention (the KV cache) stays eager."""
    import copy

    from adaptc import inductor
    from adaptc.analysis.kv_projection import kv_projection_for
    from adaptc.capture.inputs import Inputs
    from adaptc.config import CompileConfig
    from adaptc.passes._base import CompileContext
    from adaptc.runtime.stack_controller import StackPolicy, install_policy

    class Watch(StackPolicy):  # acts before every block, skips nothing: outputs stay the original's
        name = "watch"

        def __init__(self):
            self.calls = 0

        def acts_before(self, i):
            return True

        def skip(self, state, i, h, where):
            self.calls += 1
            return None

    gated = copy.deepcopy(llama)
    watch = Watch()
    install_policy(gated.model.layers, watch, kv_projection_for(gated.model.layers))
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    ctx = CompileContext(original=llama, working=gated, inputs=Inputs.of((ids,)), check_inputs=[Inputs.of((ids,))],
                         config=CompileConfig(inductor=True))
    info, compiled = inductor.apply(ctx, gated)
    assert info["mode"] == "blocks" and info["reason"] == "", info
    assert info["compiled"] == ["model.layers.{0..1}.mlp", "model.layers.{0..1}.input_layernorm",
                                "model.layers.{0..1}.post_attention_layernorm", "model.norm", "lm_head"], info
    assert "forward" in gated.model.layers[0].mlp.__dict__ and "forward" not in gated.model.layers[0].self_attn.__dict__
    before = watch.calls
    prompt = torch.tensor([[9, 8, 7]])
    assert torch.equal(greedy(gated, prompt), greedy(llama, prompt))
    assert watch.calls > before  # the policy still runs between the compiled blocks
    compiled.undo()
    assert "forward" not in gated.model.layers[0].mlp.__dict__


def test_the_speed_check_never_times_a_call_that_compiles(llama, monkeypatch):
    """torch.compile is lazy: a size's first call compiles. The speed check warms every size up first,
    so no timed call builds a graph (one would make Inductor look slower than eager and roll it back)."""
    from torch._dynamo.utils import counters

    from adaptc import speed_check

    real, compiled_while_timed = speed_check._timed, []

    def timed(fn):
        before = counters["stats"]["unique_graphs"]
        seconds = real(fn)
        compiled_while_timed.append(counters["stats"]["unique_graphs"] - before)
        return seconds

    monkeypatch.setattr(speed_check, "_timed", timed)
    ids = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(6))
    fast = adaptc.compile(llama, example_inputs=(ids,), tune=False, inductor=True, speed_check=True)
    rep = adaptc.report(fast)
    assert rep["inductor"]["mode"] == "forward"
    assert {r["size"] for r in rep["speed_check"]["sizes"]} >= {"example", "one_row", "decode"}
    assert compiled_while_timed and not any(compiled_while_timed)


def test_load_compiles_again_what_compile_compiled(fast, llama, tmp_path):
    adaptc.save(fast, tmp_path / "m.adaptc")
    loaded = adaptc.load(tmp_path / "m.adaptc")
    assert adaptc.report(loaded)["inductor"]["compiled"] == ["forward"]
    assert "forward" in loaded.__dict__
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(greedy(loaded, ids), greedy(llama, ids))
