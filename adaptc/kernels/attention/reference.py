"""The oracle for `adaptc::attention`: scaled-dot-product attention with the dense boolean mask.

The mask is spelled out from the structure (causal, sliding window, key padding) and ANDed with an
explicit `mask` when one is given. A query that sees no key gets zeros (SDPA's own convention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
               mask: torch.Tensor | None) -> tuple[int, int, int, int, int, int]:
    """(B, Hq, Hkv, Lq, Lk, D); raises ValueError when the arguments do not fit together."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D] with k and v alike; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, Dk = k.shape
    if k.shape[0] != B or Dk != D or Hq % Hkv:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (same B and D, Hq a multiple of Hkv)")
    if key_padding is not None and (key_padding.dtype != torch.bool or tuple(key_padding.shape) != (B, Lk)):
        raise ValueError(f"key_padding must be a bool [B={B}, Lk={Lk}] tensor, got {key_padding.dtype} "
                         f"{tuple(key_padding.shape)}")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (Lq, Lk)):
        raise ValueError(f"mask must be a bool [B|1, H|1, Lq={Lq}, Lk={Lk}] tensor, got {mask.dtype} {tuple(mask.shape)}")
    return B, Hq, Hkv, Lq, Lk, D


def key_range(i0: int, i1: int, Lk: int, causal: bool, window: int, q_offset: int) -> tuple[int, int]:
    """Keys [lo, hi) that queries [i0, i1) may see by structure alone."""
    lo = max(0, i0 + q_offset - window + 1) if window else 0
    hi = min(Lk, i1 - 1 + q_offset + 1) if causal else Lk
    return lo, hi


def visible(Lq: int, Lk: int, causal: bool, window: int, q_offset: int, device, q_start: int = 0,
            k_start: int = 0, k_stop: int | None = None) -> torch.Tensor | None:
    """[Lq', Lk'] bool: which keys [k_start, k_stop) the queries [q_start, Lq) may see; None = all."""
    if not causal and not window:
        return None
    k_stop = Lk if k_stop is None else k_stop
    p = torch.arange(q_start, Lq, device=device)[:, None] + q_offset
    j = torch.arange(k_start, k_stop, device=device)[None, :]
    # Compare broadcast vectors only: no [Lq, Lk] integer intermediate (512 MB at 8K tokens).
    causal_ok = j <= p if causal else None
    window_ok = j > p - window if window else None
    if causal_ok is None or window_ok is None:
        return causal_ok if window_ok is None else window_ok
    return causal_ok.logical_and_(window_ok)


def dense_mask(B: int, Lq: int, Lk: int, causal: bool, window: int, q_offset: int,
               key_padding: torch.Tensor | None, mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """The whole [B|1, H|1, Lq, Lk] boolean mask the structure and `mask` describe (None: attend to all)."""
    out = visible(Lq, Lk, causal, window, q_offset, device)
    out = out[None, None] if out is not None else None
    if key_padding is not None:
        pad = key_padding[:, None, None, :]
        out = pad if out is None else out & pad
    if mask is not None:
        out = mask if out is None else out & mask
    return out


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor | None,
                    mask: torch.Tensor | None, scale: float, causal: bool, window: int, q_offset: int) -> torch.Tensor:
    """[B, Hq, Lq, D] in q's dtype."""
    B, Hq, Hkv, Lq, Lk, D = check_args(q, k, v, key_padding, mask)
    full = dense_mask(B, Lq, Lk, causal, window, q_offset, key_padding, mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=scale, enable_gqa=Hq != Hkv)
