"""`adaptc::sparse_attention`: approximate (pattern-restricted) causal attention; see reference.py."""
from __future__ import annotations

import torch

from .._registry import KERNELS, note_call
from .reference import check_args
from .space import KERNEL_NAME


@torch.library.custom_op("adaptc::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_offset: int, block: int,
                     sinks: list[int], window: list[int], topk: list[int]) -> torch.Tensor:
    """Causal attention over the key blocks each head's pattern selects; q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]."""
    args = (q, k, v, scale, q_offset, block, sinks, window, topk)
    check_args(*args)
    kernel = KERNELS[KERNEL_NAME]
    impl, fn = kernel.select(q.device.type, *args)
    note_call(kernel, impl, args)
    return fn(*args)


@sparse_attention.register_fake
def _(q, k, v, scale, q_offset, block, sinks, window, topk):
    return torch.empty_like(q)
