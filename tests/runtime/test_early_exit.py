"""The early-exit runtime against the original model: per-row exits inside a batch equal running each
row alone; thresholds that never fire give the original bit for bit; for causal LMs, KV-cached
generation with exits equals uncached generation with exits (the skipped layers' K/V are propagated
from the exited state), and greedy generation is compared token by token with the original."""
import copy
import math

import pytest
import torch

import adaptc
from adaptc.analysis.layer_stack import find_layer_stack
from adaptc.passes.early_exit import layer_states
from adaptc.runtime.early_exit import (ExitPlan, encoder_readout, encoder_runtime_of, encoder_signals, exit_stats,
                                       install_lm_exits, lm_exits_of, LMExitHeads)
from tests.passes.test_early_exit import bert_batches, compile_ee, small_bert, small_lm

SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def classifier():
    from transformers import BertForSequenceClassification

    model = small_bert(BertForSequenceClassification, num_labels=3)
    fast = compile_ee(model, bert_batches(20), quality=0.8)
    assert encoder_runtime_of(fast) is not None
    return model, fast


def _median_thresholds(model, runtime, batch) -> list[float]:
    """Per exit, the median confidence on `batch`: about half the rows leave at the first exit."""
    s = find_layer_stack(model)
    _, states = layer_states(model, s.layers, batch)
    valid = batch["attention_mask"].bool()
    plan = runtime.plan
    out = []
    for e, layer in enumerate(plan.exit_layers):
        r_in, r_out = (encoder_readout(plan.kind, states[i], valid) for i in (layer, layer + 1))
        sig = encoder_signals(plan.kind, runtime.exit_heads[e], runtime._tail, r_in, r_out)[plan.measure]
        out.append(float(sig.detach().median()))
    return out


def test_batched_exits_equal_each_row_alone(classifier):
    model, fast = classifier
    runtime = encoder_runtime_of(fast)
    batch = bert_batches(1, rows=12, seed=5)[0]
    runtime.plan.thresholds = _median_thresholds(model, runtime, batch)
    runtime.stats.reset(len(runtime.plan.exit_layers))
    with torch.no_grad():
        together = fast(**batch).logits
        hist = list(runtime.stats.histogram)
        alone = torch.cat([fast(**{k: v[i:i + 1] for k, v in batch.items()}).logits for i in range(12)])
    assert hist[0] > 0 and sum(hist[1:]) > 0, f"want a mix of early and late rows, got {hist}"
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("never", [math.inf, 2.0])  # inf: not evaluated; 2.0: evaluated, never reached
def test_thresholds_that_never_fire_give_the_original_exactly(classifier, never):
    model, fast = classifier
    runtime = encoder_runtime_of(fast)
    runtime.plan.thresholds = [never] * len(runtime.plan.exit_layers)
    batch = bert_batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(fast(**batch).logits, model(**batch).logits)


# -- causal LMs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request):
    model = small_lm(request.param)
    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(10)]
    fast = compile_ee(model, cal, quality=0.6)
    assert lm_exits_of(fast) is not None
    return model, fast, cal


def _generate(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                          pad_token_id=0, **kw)


def test_kv_cached_generation_with_exits_equals_uncached(lm):
    model, fast, cal = lm
    stats = exit_stats(fast)
    ids = cal[3][:3, :6]
    stats.reset(len(stats.histogram) - 1)
    cached = _generate(fast, ids)
    assert sum(stats.histogram[:-1]) > 0 and stats.kv_fill_tokens > 0, "no token exited: nothing was tested"
    uncached = _generate(fast, ids, use_cache=False)
    assert torch.equal(cached, uncached)


def test_decode_rows_exit_independently(lm):
    model, fast, cal = lm
    ids = cal[4][:3, :6]
    together = _generate(fast, ids)
    alone = torch.cat([_generate(fast, ids[i:i + 1]) for i in range(3)])
    assert torch.equal(together, alone)


def test_never_exiting_generation_equals_the_original(lm):
    model, fast, cal = lm
    plan = lm_exits_of(fast).plan
    saved = list(plan.thresholds)
    try:
        plan.thresholds = [2.0] * len(saved)
        ids = cal[5][:2, :6]
        assert torch.equal(_generate(fast, ids), _generate(model, ids))
    finally:
        plan.thresholds = saved


def test_greedy_generation_with_exits_token_by_token(lm):
    """Up to the first token that differs, the prefixes are identical, so each generated token is the
    original's; the agreement afterwards is what the exits cost (measured, not assumed)."""
    model, fast, cal = lm
    ids = cal[6][:4, :6]
    got, want = _generate(fast, ids)[:, 6:], _generate(model, ids)[:, 6:]
    same = got == want
    first_diff = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1))
    for row, k in enumerate(first_diff.tolist()):
        assert torch.equal(got[row, :k], want[row, :k])
    # teacher-forced next-token agreement with exits on this held-out batch is near the calibrated 0.6
    with torch.no_grad():
        agree = (fast(cal[7]).logits.argmax(-1) == model(cal[7]).logits.argmax(-1)).float().mean()
    assert agree >= 0.5


# -- trained weights ----------------------------------------------------------------------------

@SLOW
def test_smollm2_generates_with_exits_like_the_original(smollm2):
    from adaptc.calibrate import text

    model, tok = smollm2
    tok.pad_token = tok.pad_token or tok.eos_token
    cal = text.texts("calibration", 32)
    example = dict(tok(cal[:2], return_tensors="pt", padding=True, truncation=True, max_length=32))
    fast = adaptc.compile(model, example_inputs=example, passes=["early_exit"], calibration=cal, quality=0.9,
                          tokenizer=tok, max_length=48, calibration_batch=16, tune=False, progress=False)
    (p,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == "early_exit"]
    assert p["details"]["kind"] == "causal_lm" and p["details"]["per_layer_agreement"]
    ids = tok(["The json module in Python", "In the beginning God created"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, attention_mask=ids.attention_mask)
    if p["status"] == "applied":  # calibrated exits: the guarantee held on the real runtime, caching changes nothing
        assert p["details"]["runtime_agreement_on_calibration_data"] >= 0.9 and "guarantee" in p["details"]
        assert torch.equal(fast.generate(ids.input_ids, **kw), fast.generate(ids.input_ids, use_cache=False, **kw))
    else:  # untrained for exits, SmolLM2's exits often agree too rarely to pay
        assert any(why in p["reason"] for why in ("quality 0.9", "would not pay", "runtime agreement stays below 0.9"))
    # The runtime on trained weights with exits that fire often: gate a copy with fixed exits.
    fast = copy.deepcopy(model, {id(t): t for t in [*model.parameters(), *model.buffers()]})
    s = find_layer_stack(fast)
    install_lm_exits(fast, s.layers, ExitPlan("causal_lm", [20, 25], [0.6, 0.6], "softmax_max"), s.norm, s.lm_head,
                     LMExitHeads(model.config.hidden_size, 2, predictors=False))  # identity adapters
    stats = exit_stats(fast)
    stats.reset(len(stats.histogram) - 1)
    got, want = fast.generate(ids.input_ids, **kw), model.generate(ids.input_ids, **kw)
    assert sum(stats.histogram[:-1]) > 0 and stats.kv_fill_tokens > 0, "no token exited: nothing was tested"
    assert torch.equal(got, fast.generate(ids.input_ids, use_cache=False, **kw))
    same = got == want  # token by token: identical up to the first difference
    for row in range(same.shape[0]):
        k = int(same[row].logical_not().int().argmax()) if not bool(same[row].all()) else same.shape[1]
        assert torch.equal(got[row, :k], want[row, :k]) and k >= ids.input_ids.shape[1]


def test_lm_exit_reads_its_adapter_and_learned_predictor():
    """Every token leaves at the one exit (a predictor that always says yes): the logits must be the
    model's own norm + LM head on that exit's adapter applied to the state after its block."""
    model = small_lm("llama")
    s = find_layer_stack(model)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, states = layer_states(model, s.layers, {"input_ids": ids})
        heads = LMExitHeads(32, 1, predictors=True)
        for p in heads.parameters():
            p.normal_(0, 0.1)
        heads.predictors[0].bias.fill_(50.0)  # sigmoid ~ 1 >= threshold 0.5 for every token
        want = model.lm_head(model.model.norm(heads.adapters[0](states[3])))
        fast = copy.deepcopy(model)
        s2 = find_layer_stack(fast)
        install_lm_exits(fast, s2.layers, ExitPlan("causal_lm", [2], [0.5], "learned"), s2.norm, s2.lm_head, heads)
        got = fast(ids).logits
    assert exit_stats(fast).histogram == [18, 0]
    torch.testing.assert_close(got, want)
    assert "adaptc_exit_heads.predictors.0.weight" in fast.state_dict()


@pytest.mark.parametrize("measure", ["softmax_max", "margin", "saturation"])
def test_lm_runtime_signal_is_what_calibration_measured(measure):
    """The runtime's confidence for a measure is the calibration's (saturation skips the LM head)."""
    from adaptc.runtime.early_exit import LMExitPolicy, lm_token_signals

    model = small_lm("llama")
    s = find_layer_stack(model)
    heads = LMExitHeads(32, 1, predictors=False)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.1)
        h_in, h_out = torch.randn(7, 32), torch.randn(7, 32)
        controller = LMExitPolicy(ExitPlan("causal_lm", [2], [0.5], measure), s.norm, s.lm_head, heads, 6)
        want = lm_token_signals(s.norm, s.lm_head, h_in, heads.adapters[0](h_out))[measure]
        torch.testing.assert_close(controller.signal(0, h_in, h_out), want)
