"""The approximate sparse_attention pass: calibration, report, fallbacks, and a real model's quality."""
import pytest
import torch

import adaptc
from adaptc.errors import AdaptcError
from adaptc.kernels import kernel_preference
from adaptc.kernels._registry import trace_calls

tf = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=1024, intermediate_size=96)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def token_batches(count, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 128, (1, length), generator=g),) for _ in range(count)]


def test_patterns_are_calibrated_reported_and_used():
    model = tiny_llama()
    calibration = token_batches(4, 256)
    fast = adaptc.compile(model, example_inputs=calibration[0], passes=["sparse_attention"], calibration=calibration,
                          quality=0.05)
    report = adaptc.report(fast)
    (entry,) = report["passes"]
    assert entry["status"] == "applied" and len(entry["sites"]) == 2, entry
    details = entry["details"]
    assert details["held_out"]["agreement"] >= 0.05 and details["tau"] == 0.5  # the sparsest setting passes
    assert 0 < details["density_at_calibration_length"] < 1 and details["search"]
    assert report["verification"]["sparse_attention"]["kind"] == "quality"
    assert model.config._attn_implementation == "sdpa", "the user's model must not change"
    pattern = fast.get_submodule(entry["sites"][0]).adaptc_sparse_pattern
    assert len(pattern.window) == 4 and pattern.block == 64

    ids = token_batches(1, 900, seed=1)[0][0]  # long enough that the patterns skip most blocks
    with torch.no_grad(), trace_calls() as calls:
        got = fast(ids).logits
    assert any(key[0] == "sparse_attention" for key in calls)
    with torch.no_grad(), kernel_preference("reference"):
        torch.testing.assert_close(got, fast(ids).logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, model(ids).logits, atol=1e-4), "the patterns skip blocks: outputs move"
    out = fast.generate(ids, max_new_tokens=4, do_sample=False)  # decode steps read the pattern's blocks
    assert out.shape == (1, 904)


def test_calls_the_patterns_cannot_serve_run_exact_attention():
    model = tiny_llama()
    calibration = token_batches(2, 256)
    fast = adaptc.compile(model, example_inputs=calibration[0], passes=["sparse_attention"], calibration=calibration,
                          quality=0.05)
    ids = torch.randint(3, 128, (2, 200), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :30] = 0  # padding: exact attention
    with torch.no_grad():
        want, got = model(ids, attention_mask=mask).logits, fast(ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
        short = ids[:1, :50]  # shorter than one block: nothing to skip
        torch.testing.assert_close(fast(short).logits, model(short).logits, rtol=1e-4, atol=1e-4)


def test_patterns_survive_save_and_load(tmp_path):
    model = tiny_llama()
    calibration = token_batches(2, 256)
    fast = adaptc.compile(model, example_inputs=calibration[0], passes=["sparse_attention"], calibration=calibration,
                          quality=0.05, tune=False)
    (entry,) = adaptc.report(fast)["passes"]
    assert entry["status"] == "applied", entry["reason"]
    adaptc.save(fast, tmp_path / "sparse.adaptc")
    loaded = adaptc.load(tmp_path / "sparse.adaptc")
    for path in entry["sites"]:
        assert loaded.get_submodule(path).adaptc_sparse_pattern == fast.get_submodule(path).adaptc_sparse_pattern
    ids = token_batches(1, 600, seed=3)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, fast(ids).logits)


def test_declines_and_errors_say_why():
    model = tiny_llama()
    with pytest.raises(AdaptcError, match="need calibration"):
        adaptc.compile(model, example_inputs=token_batches(1, 32)[0], passes=["sparse_attention"])
    short = token_batches(2, 32)
    fast = adaptc.compile(model, example_inputs=short[0], passes=["sparse_attention"], calibration=short)
    (entry,) = adaptc.report(fast)["passes"]
    assert entry["status"] == "skipped" and "nothing to make sparse" in entry["reason"]
    bert = tf.AutoModel.from_config(tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                                  num_attention_heads=4, intermediate_size=96)).eval()
    ids = token_batches(2, 80)
    fast = adaptc.compile(bert, example_inputs=ids[0], passes=["sparse_attention"], calibration=ids)
    assert "causal-LM" in adaptc.report(fast)["passes"][0]["reason"]


@pytest.mark.slow
def test_smollm2_meets_its_quality_target_on_held_out_text(smollm2):
    from adaptc.calibrate.text import texts

    model, tok = smollm2
    ids = tok("\n\n".join(texts("calibration", 60)), return_tensors="pt").input_ids[0]
    assert ids.numel() >= 4 * 256, "not enough calibration text"
    calibration = [(ids[i * 256:(i + 1) * 256][None],) for i in range(4)]
    fast = adaptc.compile(model, example_inputs=calibration[0], passes=["sparse_attention"], calibration=calibration,
                          quality=0.9)
    (entry,) = adaptc.report(fast)["passes"]
    assert entry["status"] == "applied", entry["reason"]
    held = entry["details"]["held_out"]
    assert held["agreement"] >= 0.9 and held["perplexity"] < 1.5 * held["perplexity_original"]
