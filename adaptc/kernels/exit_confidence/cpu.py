"""`cpu_exit_confidence`: the confidence of a large LM head without the [N, V] logits.

The vocabulary goes in chunks of CHUNK rows of the weight. Each chunk's logits [N, CHUNK] (fp32, small
enough to stay in cache) give a chunk maximum, its two largest values and its sum of exp(logit - max);
an online reduction folds them into the running top-1 logit and index, top-2 logit and sum of
exponentials, rescaled whenever the maximum moves (the online softmax). The plain path writes the
logits, then the probabilities, then reads them again for top-k: at N = 64 and V = 49152 that is two
12 MB passes through memory that this one keeps in cache.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._registry import config_for
from .reference import check_args, confidence_from_top2
from .space import KERNEL_NAME, cpu_default_config, problem


def merge_top2(t1: torch.Tensor, t2: torch.Tensor, i1: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
               j1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top two of running (t1 >= t2, index i1) and a later chunk's (c1 >= c2, index j1). A tie keeps
    the running one: it came from lower indices."""
    later_wins = c1 > t1
    new1 = torch.where(later_wins, c1, t1)
    new2 = torch.where(later_wins, torch.maximum(t1, c2), torch.maximum(t2, c1))
    return new1, new2, torch.where(later_wins, j1, i1)


def cpu_exit_confidence(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        config: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max_prob [N] fp32, margin [N] fp32, top1 [N] int64); `config` holds CHUNK."""
    N, V, D = check_args(hidden, weight, bias)
    if config is None:
        config = config_for(KERNEL_NAME, "cpu", problem(hidden, weight, bias), "cpu",
                            lambda: cpu_default_config(hidden, weight, bias))
    chunk = int(config["CHUNK"])
    h = hidden.float()
    wide = weight.dtype == torch.float32  # 16-bit weights are upcast one chunk at a time, in cache
    t1 = torch.full((N,), float("-inf"))
    t2 = torch.full((N,), float("-inf"))
    i1 = torch.zeros(N, dtype=torch.int64)
    sumexp = torch.zeros(N)
    for v0 in range(0, V, chunk):
        w = weight[v0:v0 + chunk]
        b = None if bias is None else bias[v0:v0 + chunk].float()
        logits = F.linear(h, w if wide else w.float(), b)
        if logits.shape[1] > 1:
            top = logits.topk(2, dim=1)
            c1, c2, j1 = top.values[:, 0], top.values[:, 1], top.indices[:, 0]
            tied = c1 == c2
            if bool(tied.any()):  # topk's order among equal values is unspecified: the first, as torch.max
                j1 = torch.where(tied, logits.argmax(1), j1)
            j1 = j1 + v0
        else:
            c1, j1 = logits[:, 0].clone(), torch.full((N,), v0, dtype=torch.int64)  # logits is reused in place
            c2 = torch.full_like(c1, float("-inf"))
        # exp below -80 is a denormal (slow on x86, ~50x) and adds < 1e-34 to a sum that is >= 1.
        chunk_sum = logits.sub_(c1[:, None]).clamp_(min=-80.0).exp_().sum(1)
        new1, t2, i1 = merge_top2(t1, t2, i1, c1, c2, j1)
        sumexp = sumexp * torch.exp(t1 - new1) + chunk_sum * torch.exp(c1 - new1)
        t1 = new1
    max_prob, margin = confidence_from_top2(t1, t2, sumexp)
    return max_prob, margin, i1
