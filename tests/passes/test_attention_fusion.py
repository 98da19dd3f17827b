"""Attention fusion on Hugging Face Llama, Mistral (sliding window), GPT-2 and BERT built from configs."""
import pytest
import torch

import adaptc
from adaptc.kernels._registry import trace_calls

tf = pytest.importorskip("transformers")

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, intermediate_size=96)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "mistral": lambda: tf.MistralConfig(sliding_window=16, **COMMON),
    "gpt2": lambda: tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                  bos_token_id=1, eos_token_id=2),
    "bert": lambda: tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96),
}


def build(arch):
    torch.manual_seed(0)
    cls = tf.AutoModel if arch == "bert" else tf.AutoModelForCausalLM
    return cls.from_config(CONFIGS[arch]()).eval()


def batch(seq=40, pad=6, seed=0):
    ids = torch.randint(3, 128, (2, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[0, :pad] = 0  # left padding, as batched generation has
    return ids, mask


def main_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_attention_is_fused_and_exact(arch, tmp_path):
    model = build(arch)
    ids, mask = batch()
    fast = adaptc.compile(model, example_inputs=(ids,), example_kwargs={"attention_mask": mask})
    report = adaptc.report(fast)
    (entry,) = [p for p in report["passes"] if p["name"] == "attention_fusion"]
    assert entry["status"] == "applied" and len(entry["sites"]) == 2, entry
    assert model.config._attn_implementation == "sdpa", "the user's model must not change"

    ids2, mask2 = batch(seq=300, pad=40, seed=1)  # longer than the blocks: real skipping
    with torch.no_grad(), trace_calls() as calls:
        want, got = main_output(model(ids2, attention_mask=mask2)), main_output(fast(ids2, attention_mask=mask2))
    problems = [dict(key[3]) for key in calls if key[0] == "attention"]
    if report["capture"]["granularity"] == "graph":  # exported (BERT): the mask's contents are unknown at
        assert problems and all(p["masked"] for p in problems)  # trace time, so the op reads it
    else:
        assert problems and all(p["padded"] and not p["masked"] for p in problems)  # structure, not a dense mask
    if arch == "mistral":
        assert {p["window"] for p in problems} == {16}
    real = mask2.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)

    if arch != "bert":
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(fast.generate(ids, attention_mask=mask, **kw), model.generate(ids, attention_mask=mask, **kw))
    path = tmp_path / "m.adaptc"
    adaptc.save(fast, path)
    loaded = adaptc.load(path)
    with torch.no_grad():
        torch.testing.assert_close(main_output(loaded(ids2, attention_mask=mask2))[real], want[real], rtol=1e-4, atol=1e-4)


def test_other_attention_implementations_are_declined():
    model = build("llama")
    model.config._attn_implementation = "flex_attention"
    fast = adaptc.compile(model, example_inputs=(batch()[0],), passes=["attention_fusion"], tune=False)
    (entry,) = adaptc.report(fast)["passes"]
    assert entry["status"] == "skipped" and "flex_attention" in entry["declined"][0]["reason"]


def test_a_mask_without_known_structure_goes_to_the_op_whole():
    from adaptc.passes.attention_fusion import mask_structure

    mask = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.5
    s = mask_structure(mask, 12, 12, causal=True, window=0)
    assert s.mask is mask and s.key_padding is None
    causal = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 12, 12).clone()
    s = mask_structure(causal, 12, 12, causal=True, window=0)
    assert s.mask is None and s.causal and s.window == 0


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
def test_fused_model_runs_the_triton_kernel():
    from adaptc.kernels import kernel_preference

    model = build("mistral")
    ids, mask = batch(seq=24, pad=3)
    fast = adaptc.compile(model, example_inputs=(ids,), example_kwargs={"attention_mask": mask}, tune=False)
    with torch.no_grad(), kernel_preference("triton"), trace_calls() as calls:
        got = fast(ids, attention_mask=mask).logits
    assert {key[1] for key in calls if key[0] == "attention"} == {"triton"}
    real = mask.bool()
    torch.testing.assert_close(got[real], model(ids, attention_mask=mask).logits[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])  # inference tensors count no versions
def test_a_mask_edited_in_place_is_explained_again(context):
    model = build("llama")
    L = 24
    ids = torch.randint(3, 128, (2, L), generator=torch.Generator().manual_seed(3))
    fast = adaptc.compile(model, example_inputs=(ids,), passes=["attention_fusion"], tune=False)
    with context():
        mask = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(2, 1, L, L).clone()
        torch.testing.assert_close(fast(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits,
                                   rtol=1e-4, atol=1e-4)
        mask[0, :, :, :5] = False  # the first row now left-padded: the same tensor, other contents
        mask[0, :, torch.arange(L), torch.arange(L)] = True
        want = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(fast(ids, attention_mask=mask).logits, want, rtol=1e-4, atol=1e-4)


def gemma2(**extra):
    torch.manual_seed(0)
    config = tf.Gemma2Config(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=128,
                             sliding_window=16, **extra)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("softcap,reason", [
    (50.0, "the model soft-caps its attention logits (attn_logit_softcapping=50.0), "
           "which adaptc::attention does not compute"),
    (None, "Gemma2ForCausalLM declares no SDPA support (_supports_sdpa = False)"),
])
def test_a_model_without_sdpa_support_is_declined_for_that_reason(softcap, reason):
    model = gemma2(attn_logit_softcapping=softcap)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    calibration = [(torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(1)),)]
    fast = adaptc.compile(model, example_inputs=(ids,), passes=["attention_fusion", "sparse_attention"],
                          calibration=calibration, quality=0.05, tune=False)
    for entry in adaptc.report(fast)["passes"]:
        assert entry["status"] == "skipped" and reason in entry["reason"], entry
        assert len(entry["declined"]) == 2 and all(reason in d["reason"] for d in entry["declined"])
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, model(ids).logits)
