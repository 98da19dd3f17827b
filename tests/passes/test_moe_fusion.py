"""MoE fusion on real Hugging Face architectures and on user-written blocks: applied, exact, saved."""
import os

import pytest
import torch
from torch import nn

import adaptc
from adaptc.kernels import kernel_preference
from adaptc.passes.moe_fusion import FusedMoE
from tests.moe_models import EXPERTS_IMPLEMENTATIONS, HF_MOE, UserMoE, UserMoEModel, hf_causal_lm

pytest.importorskip("transformers")


def ids(batch=2, seq=7, vocab=96, seed=0):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def moe_status(fast):
    (entry,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == "moe_fusion"]
    return entry


@pytest.mark.parametrize("arch", HF_MOE)
def test_hf_moe_fused_exact_generate_and_save(arch, tmp_path):
    model = hf_causal_lm(arch)
    x = ids()
    fast = adaptc.compile(model, example_inputs=(x,))
    entry = moe_status(fast)
    assert entry["status"] == "applied", entry
    blocks = [n for n, m in model.named_modules() if type(m).__name__.endswith("SparseMoeBlock")]
    assert sorted(entry["sites"]) == sorted(blocks) and len(blocks) == 2
    assert all(isinstance(fast.get_submodule(b), FusedMoE) for b in blocks)
    assert not any(isinstance(m, FusedMoE) for m in model.modules()), "the user's model must not change"
    # parameters are shared with the original, not copied
    assert fast.get_submodule(blocks[0]).w13.data_ptr() == model.get_submodule(blocks[0]).experts.gate_up_proj.data_ptr()
    if arch == "qwen2_moe":  # its shared expert runs through the op as well
        assert fast.get_submodule(blocks[0]).shared_w13 is not None

    y = ids(batch=3, seq=11, seed=5)
    with torch.no_grad():
        want, got = model(y), fast(y)
    assert type(got) is type(want)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)

    prompt = ids(batch=2, seq=5, seed=9)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fast.generate(prompt, **kw), model.generate(prompt, **kw))

    report = adaptc.report(fast)
    assert report["verification"]["moe_fusion"]["ok"] and report["verification"]["moe_fusion"]["inputs_checked"] >= 3
    assert report["capture"]["granularity"] == "blocks"
    path = tmp_path / "m.adaptc"
    adaptc.save(fast, path)
    loaded = adaptc.load(path)
    assert all(isinstance(loaded.get_submodule(b), FusedMoE) for b in blocks)
    with torch.no_grad():
        torch.testing.assert_close(loaded(y).logits, want.logits, rtol=1e-4, atol=1e-4)
    assert adaptc.report(loaded)["passes"] == report["passes"]


@pytest.mark.parametrize("impl", EXPERTS_IMPLEMENTATIONS)
def test_every_experts_implementation_is_recognised(impl):
    model = hf_causal_lm("mixtral", experts_implementation=impl)
    fast = adaptc.compile(model, example_inputs=(ids(),))
    assert moe_status(fast)["status"] == "applied"
    with torch.no_grad():
        torch.testing.assert_close(fast(ids(seed=3)).logits, model(ids(seed=3)).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_dtype_tolerance(dtype):
    model = hf_causal_lm("qwen2_moe", dtype=dtype)
    fast = adaptc.compile(model, example_inputs=(ids(),))
    assert moe_status(fast)["status"] == "applied", moe_status(fast)
    assert adaptc.report(fast)["verification"]["moe_fusion"]["max_rel"] < 4e-2


VARIANTS = [
    dict(scoring="softmax_topk", renormalize=True),
    dict(scoring="softmax_topk", renormalize=False),
    dict(scoring="topk_softmax"),
    dict(scoring="sigmoid_topk", renormalize=True),
    dict(scoring="softmax_topk", renormalize=False, shared=True),
    dict(scoring="softmax_topk", gated=False, act="gelu"),
    dict(scoring="softmax_topk", act="relu", top_k=3, expose_top_k=False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in v))
def test_user_written_moe_variants(variant, tmp_path):
    torch.manual_seed(0)
    model = UserMoEModel(**variant).eval()
    x = torch.randint(0, 64, (2, 9))
    fast = adaptc.compile(model, example_inputs=(x,), speed_check=True)
    entry = moe_status(fast)
    assert entry["status"] == "applied" and entry["sites"] == ["moes.0", "moes.1"], entry
    capture = adaptc.report(fast)["capture"]
    assert (capture["granularity"], capture["method"]) == ("graph", "export")
    # compile timed graph, eager rewrite and original at the example and one row, and routes each to the fastest
    sizes = {s["size"]: s for s in adaptc.report(fast)["speed_check"]["sizes"]}
    assert set(sizes) == {"example", "one_row"} and sizes["one_row"]["route"] in ("graph", "eager", "original")
    y = torch.randint(0, 64, (3, 13))
    with torch.no_grad():
        torch.testing.assert_close(fast(y), model(y), rtol=1e-4, atol=1e-5)
        for route in ("graph", "eager", "original"):  # every route computes the same function
            fast.original, fast.routes = model, {"one_row": route}
            one = torch.randint(0, 64, (1, 1))
            torch.testing.assert_close(fast(one), model(one), rtol=1e-4, atol=1e-5)
    adaptc.save(fast, tmp_path / "u.adaptc")
    loaded = adaptc.load(tmp_path / "u.adaptc")
    with torch.no_grad():
        torch.testing.assert_close(loaded(y), model(y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared", [None, "plain", "biased", "per-channel-gate"])
def test_graph_holds_one_fused_op_per_block_and_plain_shared_expert(shared):
    """A plain-MLP shared expert is one more fused_moe call; one the op cannot express stays a module."""
    torch.manual_seed(0)
    model = UserMoEModel(shared=shared is not None).eval()
    for block in model.moes if shared in ("biased", "per-channel-gate") else ():
        if shared == "biased":
            block.shared_expert.w2.bias = nn.Parameter(torch.randn(32) * 0.1)
        else:  # a gate per hidden channel: the op weighs a token's row by one scalar
            block.shared_expert_gate = nn.Linear(32, 32, bias=False)
    x = torch.randint(0, 64, (2, 5))
    fast = adaptc.compile(model, example_inputs=(x,))
    assert moe_status(fast)["status"] == "applied"
    targets = [str(n.target) for n in fast._program.graph.nodes if n.op == "call_function"]
    assert sum("adaptc.fused_moe" in t for t in targets) == (4 if shared == "plain" else 2)
    y = torch.randint(0, 64, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(fast(y), model(y), rtol=1e-4, atol=1e-5)


class TemperatureMoE(UserMoE):
    """Routes with a temperature no candidate variant has: must be declined, not approximated."""

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx = (self.router(x) / 3.0).softmax(-1).topk(self._k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(idx == e)
            out.index_add_(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return out.reshape(shape)


def test_unknown_routing_is_declined_with_a_reason():
    torch.manual_seed(0)
    block = TemperatureMoE().eval()
    x = torch.randn(2, 5, 32)
    fast = adaptc.compile(block, example_inputs=(x,))
    entry = moe_status(fast)
    assert entry["status"] == "skipped" and entry["declined"][0]["reason"].startswith("no supported routing")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), block(x))


def test_no_moe_is_skipped_with_reason():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    fast = adaptc.compile(model, example_inputs=(torch.randn(2, 8),))
    entry = moe_status(fast)
    assert entry["status"] == "skipped" and "no Mixture-of-Experts" in entry["reason"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_fused_model_runs_the_triton_kernels():
    model = hf_causal_lm("qwen2_moe")
    fast = adaptc.compile(model, example_inputs=(ids(),), tune=False)
    y = ids(batch=2, seq=6, seed=3)
    with torch.no_grad(), kernel_preference("triton"):
        torch.testing.assert_close(fast(y).logits, model(y).logits, rtol=1e-4, atol=1e-4)
