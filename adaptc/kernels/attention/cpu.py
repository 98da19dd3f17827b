"""`cpu_attention`: attention that costs what its mask says, on the CPU.

Queries go in blocks of BLOCK_M. For each block the keys it can see form one contiguous range —
from the structure (causal: up to the block's last position; sliding window: from the first
position minus the window; key padding: inside the batch's real tokens) and, for an explicit mask,
from the first to the last column the block's rows use. SDPA (PyTorch's CPU flash kernel) runs on
that range only, with the small mask of the block. A sliding window of 256 over 8K tokens reads
about 1/16 of the keys dense attention reads.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._registry import config_for
from .reference import check_args, key_range, visible
from .space import KERNEL_NAME, cpu_default_config, problem


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                  mask: torch.Tensor | None, scale: float, causal: bool, window: int, q_offset: int,
                  config: dict[str, Any] | None = None) -> torch.Tensor:
    args = (q, k, v, key_padding, mask, scale, causal, window, q_offset)
    B, Hq, Hkv, Lq, Lk, D = check_args(q, k, v, key_padding, mask)
    if config is None:
        config = config_for(KERNEL_NAME, "cpu", problem(*args), "cpu", lambda: cpu_default_config(*args))
    block = int(config["BLOCK_M"])
    gqa = Hq != Hkv
    if mask is None and key_padding is None and not window and (not causal or q_offset == 0):
        # Full, or causal aligned at the top left (SDPA's is_causal): SDPA's CPU flash kernel already
        # skips the tiles above the diagonal.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
    real_lo, real_hi = 0, Lk
    if key_padding is not None:  # keys no batch row uses at either end are never read
        used = key_padding.any(0).nonzero()
        real_lo, real_hi = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, 0)
    out = q.new_zeros((B, Lq, Hq, D)).transpose(1, 2)  # the op's layout (op.py)
    for i0 in range(0, Lq, block):
        i1 = min(Lq, i0 + block)
        lo, hi = key_range(i0, i1, Lk, causal, window, q_offset)
        lo, hi = max(lo, real_lo), min(hi, real_hi)
        tile_mask = mask[..., i0:i1, lo:hi] if mask is not None and hi > lo else None
        if tile_mask is not None:  # an explicit mask narrows the range to the columns it uses
            cols = tile_mask.flatten(0, -2).any(0).nonzero()
            if cols.numel() == 0:
                continue
            lo, hi = lo + int(cols[0]), lo + int(cols[-1]) + 1
            tile_mask = mask[..., i0:i1, lo:hi]
        if hi <= lo:
            continue  # these queries see no key: zeros, as SDPA gives
        m = visible(i1, Lk, causal, window, q_offset, q.device, q_start=i0, k_start=lo, k_stop=hi)
        m = m[None, None] if m is not None else None
        if key_padding is not None and not bool(key_padding[:, lo:hi].all()):
            pad = key_padding[:, None, None, lo:hi]
            m = pad if m is None else m & pad
        if tile_mask is not None:
            m = tile_mask if m is None else m & tile_mask
        out[:, :, i0:i1] = F.scaled_dot_product_attention(
            q[:, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=m, scale=scale, enable_gqa=gqa)
    return out
