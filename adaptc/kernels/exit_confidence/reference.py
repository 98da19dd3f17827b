"""The oracle for `adaptc::exit_confidence`: materialise the logits, softmax them, take the top two.

Given hidden [N, D], an LM head weight [V, D] and an optional bias [V], each row's logits are
hidden @ weight.T + bias, computed in fp32 (16-bit inputs are upcast exactly). The outputs are the
top-1 probability, the margin (top-1 minus top-2 probability; with V == 1 the top-2 probability is 0)
and the top-1 index (the lowest index among equal maxima, as torch.max gives).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_args(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    """(N, V, D); raises ValueError when the arguments do not fit together."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, D] and weight [V, D]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    N, D = hidden.shape
    V, Dw = weight.shape
    if Dw != D:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit hidden {tuple(hidden.shape)}: both need D={D}")
    if V == 0:
        raise ValueError("weight has no rows: an empty vocabulary has no confidence")
    if hidden.dtype not in DTYPES or weight.dtype not in DTYPES:
        raise ValueError(f"dtypes ({hidden.dtype}, {weight.dtype}) must be in {DTYPES}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != V or not bias.is_floating_point()):
        raise ValueError(f"bias must be a floating [V={V}] tensor, got {bias.dtype} {tuple(bias.shape)}")
    return N, V, D


def confidence_from_top2(top1_logit: torch.Tensor, top2_logit: torch.Tensor,
                         sumexp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_prob, margin) from the top two logits and sum(exp(logits - top1_logit))."""
    max_prob = 1.0 / sumexp
    return max_prob, max_prob * (1.0 - torch.exp(top2_logit - top1_logit))


def torch_exit_confidence(hidden: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max_prob [N] fp32, margin [N] fp32, top1 [N] int64) of softmax(hidden @ weight.T + bias)."""
    N, V, D = check_args(hidden, weight, bias)
    logits = F.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    probs = logits.softmax(-1)
    max_prob, top1 = probs.max(-1)
    second = probs.topk(2, -1).values[:, 1] if V > 1 else torch.zeros_like(max_prob)
    return max_prob, max_prob - second, top1
