"""`adaptc::attention`: every fused attention site calls this one op (see reference.py for the math)."""
from __future__ import annotations

import torch

from .._registry import KERNELS, note_call
from .reference import check_args
from .space import KERNEL_NAME


@torch.library.custom_op("adaptc::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
              mask: torch.Tensor | None, scale: float, causal: bool, window: int, q_offset: int) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] (GQA when Hq > Hkv).

    Query i sits at position q_offset + i, key j at j. A key is visible when causal allows it (j <= pos),
    the sliding window does (pos - j < window; 0 = none), key_padding[b, j] is True (None = all) and
    the explicit bool mask [B|1, H|1, Lq, Lk] is True (None = all).
    """
    args = (q, k, v, key_padding, mask, scale, causal, window, q_offset)
    check_args(q, k, v, key_padding, mask)
    kernel = KERNELS[KERNEL_NAME]
    impl, fn = kernel.select(q.device.type, *args)
    note_call(kernel, impl, args)
    out = fn(*args)
    if out.stride() != _strides(q):  # one layout, the one the fake promises: Inductor asserts it
        out = _layout(q).copy_(out)
    return out


@attention.register_fake
def _(q, k, v, key_padding, mask, scale, causal, window, q_offset):
    return _layout(q)


def _layout(q: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] stored as [B, L, H, D] (SDPA's CPU flash output): the caller's transpose back to
    [B, L, H*D] is then free."""
    B, H, L, D = q.shape
    return q.new_empty((B, L, H, D)).transpose(1, 2)


def _strides(q: torch.Tensor) -> tuple[int, ...]:
    B, H, L, D = q.shape
    return (L * H * D, D, H * D, 1)
