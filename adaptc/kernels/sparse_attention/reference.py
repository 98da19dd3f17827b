"""The oracle for `adaptc::sparse_attention`: causal attention restricted to a per-head block pattern.

Keys and queries go in blocks of `block` positions (absolute: query i sits at q_offset + i). A query
block sees, per head h: the first `sinks[h]` key blocks (attention sinks), the `window[h]` key blocks
ending at its own (the local window; >= 1, so the diagonal is always there), and the `topk[h]` other
causal key blocks whose mean key scores highest against the block's mean query (a cheap estimate of
where the mass is). Inside the chosen blocks attention is causal and exact. `select_blocks` is part
of the op's definition: every implementation computes the same selection from it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_args(q, k, v, scale: float, q_offset: int, block: int, sinks, window, topk) -> tuple[int, int, int, int, int, int]:
    """(B, Hq, Hkv, Lq, Lk, D); raises ValueError when the arguments do not fit together."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q, k, v must be [B, H, L, D] with k and v alike; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or Hq % Hkv:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)} (same B and D, Hq a multiple of Hkv)")
    if not 0 <= q_offset <= Lk - Lq:
        raise ValueError(f"queries at positions [{q_offset}, {q_offset + Lq}) need keys up to there; Lk={Lk}")
    if block < 1 or not (len(sinks) == len(window) == len(topk) == Hq):
        raise ValueError(f"block must be >= 1 and sinks/window/topk one value per query head ({Hq})")
    if min(window) < 1 or min(sinks) < 0 or min(topk) < 0:
        raise ValueError("window must be >= 1 block (the diagonal); sinks and topk >= 0")
    return B, Hq, Hkv, Lq, Lk, D


def query_blocks(Lq: int, q_offset: int, block: int) -> tuple[int, int, int]:
    """(index of the first query block, number of query blocks, rows of padding before the first query)."""
    first = q_offset // block
    return first, (q_offset + Lq - 1) // block - first + 1, q_offset % block


def _pooled(x: torch.Tensor, front: int, nblocks: int, block: int) -> torch.Tensor:
    """Mean of each block of rows of x [B, H, L, D] (rows placed `front` rows into the first block)."""
    L = x.shape[2]
    padded = F.pad(x.float(), (0, 0, front, nblocks * block - front - L))
    count = F.pad(x.new_ones(L, dtype=torch.float32), (front, nblocks * block - front - L)).view(nblocks, block).sum(1)
    return padded.view(*x.shape[:2], nblocks, block, x.shape[3]).sum(3) / count[:, None]


def select_blocks(q: torch.Tensor, k: torch.Tensor, scale: float, q_offset: int, block: int,
                  sinks: list[int], window: list[int], topk: list[int]) -> torch.Tensor:
    """[B, Hq, query blocks, key blocks] bool: which key blocks each query block reads."""
    B, Hq, Hkv, Lq, Lk, D = check_args(q, k, k, scale, q_offset, block, sinks, window, topk)
    first, nq, front = query_blocks(Lq, q_offset, block)
    nk = -(-Lk // block)
    dev = q.device
    qb = torch.arange(first, first + nq, device=dev)[:, None]           # absolute query block
    j = torch.arange(nk, device=dev)[None, :]
    causal = j <= qb                                                     # [nq, nk]
    s = torch.tensor(sinks, device=dev)[:, None, None]
    w = torch.tensor(window, device=dev)[:, None, None]
    forced = causal & ((j < s) | (qb - j < w))                           # [Hq, nq, nk]
    sel = forced.unsqueeze(0).expand(B, -1, -1, -1)
    kmax = min(max(topk), nk)
    if kmax == 0:
        return sel.contiguous()
    kp = _pooled(k, 0, nk, block).repeat_interleave(Hq // Hkv, dim=1)   # [B, Hq, nk, D]
    qp = _pooled(q, front, nq, block)                                   # [B, Hq, nq, D]
    scores = (qp @ kp.transpose(-1, -2)).masked_fill(~(causal & ~forced), float("-inf"))
    values, index = scores.topk(kmax, dim=-1)                           # ties: topk's order, shared by all
    rank_ok = torch.arange(kmax, device=dev) < torch.tensor(topk, device=dev)[:, None, None]
    chosen = torch.zeros_like(sel).scatter_(-1, index, rank_ok & values.isfinite())
    return sel | chosen


def dense_mask(sel: torch.Tensor, Lq: int, Lk: int, q_offset: int, block: int) -> torch.Tensor:
    """The [B, Hq, Lq, Lk] bool mask a block selection means (causal inside the blocks)."""
    first = q_offset // block
    pos = torch.arange(q_offset, q_offset + Lq, device=sel.device)
    rows = sel[:, :, pos // block - first]                              # [B, Hq, Lq, nk]
    cols = rows.repeat_interleave(block, dim=-1)[..., :Lk]
    return cols & (torch.arange(Lk, device=sel.device)[None, :] <= pos[:, None])


def torch_sparse_attention(q, k, v, scale: float, q_offset: int, block: int, sinks: list[int], window: list[int],
                           topk: list[int]) -> torch.Tensor:
    """[B, Hq, Lq, D] in q's dtype: SDPA with the dense mask of the selected blocks."""
    B, Hq, Hkv, Lq, Lk, D = check_args(q, k, v, scale, q_offset, block, sinks, window, topk)
    sel = select_blocks(q, k, scale, q_offset, block, sinks, window, topk)
    mask = dense_mask(sel, Lq, Lk, q_offset, block)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
