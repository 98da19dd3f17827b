"""SDPA fusion on user-written attention modules: causal, padding masks, GQA; exact; exported graph."""
import torch
import torch.nn.functional as F
from torch import nn

import adaptc
from adaptc.kernels._registry import trace_calls
from adaptc.passes.sdpa_fusion import SdpaIntercept


class SelfAttention(nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=2, causal=True, float_mask=False):
        super().__init__()
        self.heads, self.kv_heads, self.causal, self.float_mask = heads, kv_heads, causal, float_mask
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim // heads * kv_heads)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.kv_heads, -1).permute(2, 0, 3, 1, 4)
        if mask is not None:  # [B, L] padding -> [B, 1, L, L] boolean, causal folded in
            mask = mask[:, None, None, :].bool() & torch.ones(L, L, dtype=torch.bool).tril()
            if self.float_mask:
                mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                             enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.layers = nn.ModuleList(SelfAttention(**kw) for _ in range(2))

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = x + layer(x, mask)
        return x


def test_causal_sdpa_is_fused_and_exported():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 40, 32)
    fast = adaptc.compile(model, example_inputs=(x,), tune=False)
    (entry,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == "sdpa_fusion"]
    assert entry["status"] == "applied" and sorted(entry["sites"]) == ["layers.0", "layers.1"]
    assert adaptc.report(fast)["capture"]["method"] == "export"
    assert sum("adaptc.attention" in str(n.target) for n in fast._program.graph.nodes) == 2
    y = torch.randn(3, 70, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(y), model(y), rtol=1e-4, atol=1e-5)


def test_padding_mask_structure_reaches_the_op():
    torch.manual_seed(1)
    model = Net().eval()
    x, mask = torch.randn(2, 30, 32), torch.ones(2, 30, dtype=torch.long)
    mask[0, 20:] = 0
    fast = adaptc.compile(model, example_inputs=(x, mask), capture="blocks", tune=False)
    assert all(isinstance(fast.layers[i], SdpaIntercept) for i in range(2))
    with torch.no_grad(), trace_calls() as calls:
        got = fast(x, mask)
    (problem,) = {tuple(sorted(dict(k[3]).items())) for k in calls if k[0] == "attention"}
    assert dict(problem)["causal"] and dict(problem)["padded"] and not dict(problem)["masked"]
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(got[real], model(x, mask)[real], rtol=1e-4, atol=1e-5)


def test_float_masks_are_declined_with_a_reason():
    model = Net(float_mask=True).eval()
    x, mask = torch.randn(2, 12, 32), torch.ones(2, 12, dtype=torch.long)
    fast = adaptc.compile(model, example_inputs=(x, mask), capture="blocks", tune=False)
    (entry,) = [p for p in adaptc.report(fast)["passes"] if p["name"] == "sdpa_fusion"]
    assert entry["status"] == "skipped" and "additive (float) mask" in entry["declined"][0]["reason"]
