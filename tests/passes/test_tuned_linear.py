"""tuned_linear: every CPU nn.Linear on adaptc::linear, in graphs and blocks, fp32 and bf16, saved and loaded."""
import pytest
import torch
from torch import nn

import adaptc
from adaptc.kernels._registry import trace_calls
from adaptc.passes.tuned_linear import AdaptcLinear

tf = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=512, tie_word_embeddings=True)


def llama(dtype=torch.float32):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).eval().to(dtype)


def bert_classifier():
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=96,
                                                          num_labels=3)).eval()


def ids(batch=2, seq=24, seed=0):
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def entry(fast):
    (e,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == "tuned_linear"]
    return e


def test_an_exported_classifier_runs_every_linear_on_the_op():
    model = bert_classifier()
    x, mask = ids(), torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0
    fast = adaptc.compile(model, example_inputs=(x,), example_kwargs={"attention_mask": mask}, tune=False)
    e = entry(fast)
    linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert e["status"] == "applied" and sorted(e["sites"]) == sorted(linears)
    assert e["details"]["linear_weight_bytes"] == sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    assert adaptc.report(fast)["capture"]["granularity"] == "graph"
    assert sum("adaptc.linear" in str(n.target) for n in fast._program.graph.nodes) == len(linears)
    x2, mask2 = ids(3, 57, seed=1), torch.ones(3, 57, dtype=torch.long)
    with torch.no_grad(), trace_calls() as calls:
        got = fast(x2, attention_mask=mask2).logits
    assert {k[0] for k in calls} >= {"linear"}
    torch.testing.assert_close(got, model(x2, attention_mask=mask2).logits, atol=1e-4, rtol=1e-4)


def test_a_causal_lm_generates_the_same_tokens_and_round_trips(tmp_path):
    model = llama()
    fast = adaptc.compile(model, example_inputs=(ids(),), tune=False)
    assert entry(fast)["status"] == "applied"
    swapped = [m for m in fast.modules() if isinstance(m, AdaptcLinear)]
    assert swapped and all(isinstance(m, nn.Linear) for m in swapped)
    assert all(list(m.state_dict()) == ["weight"] for m in swapped)  # Llama's linears have no bias
    assert fast.lm_head.weight is model.lm_head.weight is model.model.embed_tokens.weight  # shared and still tied
    assert not any(isinstance(m, AdaptcLinear) for m in model.modules()), "the user's model must not change"
    prompt = ids(2, 12, seed=2)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    assert torch.equal(fast.generate(prompt, attention_mask=torch.ones_like(prompt), **kw), want)
    path = tmp_path / "m.adaptc"
    adaptc.save(fast, path)
    loaded = adaptc.load(path)
    assert any(isinstance(m, AdaptcLinear) for m in loaded.modules())
    assert torch.equal(loaded.generate(prompt, attention_mask=torch.ones_like(prompt), **kw), want)


def test_bf16_runs_on_the_op_within_bf16_tolerance():
    model = llama(torch.bfloat16)
    fast = adaptc.compile(model, example_inputs=(ids(),), tune=False)
    assert entry(fast)["status"] == "applied"
    x = ids(3, 31, seed=3)
    with torch.inference_mode():
        got, want = fast(x).logits.float(), model(x).logits.float()
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_fp16_layers_are_left_alone_with_the_reason():
    model = llama(torch.float16)
    fast = adaptc.compile(model, example_inputs=(ids(),), tune=False, passes=["tuned_linear"])
    e = entry(fast)
    assert e["status"] == "skipped" and "float32/bfloat16" in e["reason"]


def test_gradients_still_flow_through_the_compiled_layers():
    model = llama()
    fast = adaptc.compile(model, example_inputs=(ids(),), tune=False, passes=["tuned_linear"])
    x = ids(2, 9, seed=4)
    fast(x).logits.square().mean().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x).logits.square().mean().backward()
    assert got and all(torch.allclose(got[n], p.grad, atol=1e-5, rtol=1e-4) for n, p in model.named_parameters() if n in got)


def test_gpt2_conv1d_layers_run_on_the_op():
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256)).eval()
    fast = adaptc.compile(model, example_inputs=(ids(),), tune=False)
    e = entry(fast)
    assert e["status"] == "applied" and "transformer.h.0.attn.c_attn" in e["sites"] and "lm_head" in e["sites"]
    prompt = ids(1, 10, seed=5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(fast.generate(prompt, **kw), model.generate(prompt, **kw))
