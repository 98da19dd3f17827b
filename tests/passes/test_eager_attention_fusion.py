"""Eager attention fusion: hand-written matmul / mask / softmax / matmul attention runs on adaptc::attention."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptc
from adaptc.kernels._registry import trace_calls


class Attention(nn.Module):
    """nanoGPT's CausalSelfAttention, with switches for the variants people write."""

    def __init__(self, mask="causal", scale_on="scores", dropout=0.0, return_weights=False, n_embd=32, n_head=4):
        super().__init__()
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.n_head, self.mask, self.scale_on, self.return_weights = n_head, mask, scale_on, return_weights
        self.drop = nn.Dropout(dropout)
        self.register_buffer("tril", torch.tril(torch.ones(256, 256)).view(1, 1, 256, 256))
        self.register_buffer("alibi", torch.randn(1, n_head, 256, 256))

    def forward(self, x, pad=None):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        if self.scale_on == "q":
            att = (q / math.sqrt(k.size(-1))) @ k.transpose(-2, -1)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        if self.mask == "causal":
            att = att.masked_fill(self.tril[:, :, :T, :T] == 0, float("-inf"))
        elif self.mask == "padding":
            att = att.masked_fill(~pad[:, None, None, :], -1e9)
        elif self.mask == "alibi":
            att = att + self.alibi[:, :, :T, :T]
        w = self.drop(F.softmax(att, dim=-1))
        y = (w @ v).transpose(1, 2).contiguous().view(B, T, C)
        return (self.proj(y), w) if self.return_weights else self.proj(y)


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.blocks = nn.ModuleList([Attention(**kw) for _ in range(2)])

    def forward(self, ids, pad=None):
        x = self.emb(ids)
        for b in self.blocks:
            out = b(x, pad)
            x = x + (out[0] if isinstance(out, tuple) else out)
        return x


def entry(fast):
    (e,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == "eager_attention_fusion"]
    return e


@pytest.mark.parametrize("variant", [dict(mask="causal"), dict(mask="causal", scale_on="q", dropout=0.1),
                                     dict(mask="none"), dict(mask="padding")], ids=lambda v: "-".join(map(str, v.values())))
def test_hand_written_attention_is_fused_and_exact(variant):
    torch.manual_seed(0)
    model = Net(**variant).eval()
    g = torch.Generator().manual_seed(1)

    def batch(rows, length, padded):  # ids, and for the padding variant a key mask with one row padded
        ids = torch.randint(0, 100, (rows, length), generator=g)
        if variant["mask"] != "padding":
            return ids, {}
        pad = torch.ones(rows, length, dtype=torch.bool)
        pad[padded, : length // 3] = False
        return ids, {"pad": pad}

    ids, kwargs = batch(2, 20, 0)
    fast = adaptc.compile(model, example_inputs=(ids,), example_kwargs=kwargs, tune=False)
    e = entry(fast)
    assert e["status"] == "applied" and e["sites"] == ["blocks.0", "blocks.1"], e
    ids2, kwargs2 = batch(3, 90, 1)
    with torch.no_grad(), trace_calls() as calls:
        got = fast(ids2, **kwargs2)
    assert any(key[0] == "attention" for key in calls), "the fused op runs"
    torch.testing.assert_close(got, model(ids2, **kwargs2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant,why", [(dict(mask="alibi"), "additive float mask"),
                                         (dict(mask="causal", return_weights=True), "do not feed one matmul")])
def test_chains_it_cannot_prove_exact_are_left_alone(variant, why):
    torch.manual_seed(0)
    model = Net(**variant).eval()
    ids = torch.randint(0, 100, (2, 20))
    fast = adaptc.compile(model, example_inputs=(ids,), tune=False)
    e = entry(fast)
    assert e["status"] == "skipped" and all(why in d["reason"] for d in e["declined"]), e
    with torch.no_grad():
        torch.testing.assert_close(fast(ids), model(ids))
