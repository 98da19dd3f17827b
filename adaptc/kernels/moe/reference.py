"""The oracle for `adaptc::fused_moe`: plain torch, one expert at a time, math like Hugging Face eager.

Each expert's projections and activation run in the input dtype (as `MixtralExperts.forward`
does); the weighted combine over the top-k experts runs in fp32 and is cast back once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .space import moe_dims


def activation_fn(name: str):
    """The torch function for an activation name of the op contract."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")


def torch_fused_moe(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]); shape [T, H], hidden's dtype."""
    T, H, I, E, K = moe_dims(hidden, topk_weights, topk_ids, w13, w2, activation, gated)
    act = activation_fn(activation)
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    ids = topk_ids.long()
    for e in ids.unique().tolist():
        token_idx, k_idx = torch.where(ids == e)
        h = F.linear(hidden[token_idx], w13[e])
        h = act(h[:, :I]) * h[:, I:] if gated else act(h)
        y = F.linear(h, w2[e])
        out.index_add_(0, token_idx, y.float() * topk_weights[token_idx, k_idx, None].float())
    return out.to(hidden.dtype)
