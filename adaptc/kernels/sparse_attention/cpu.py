"""`cpu_sparse_attention`: gathers each query block's selected key blocks and runs SDPA on them only.

The selection is padded to the largest count S any query block has, so a chunk of query blocks is
one batched SDPA over [S * block] keys. The diagonal block is gathered first, so one triangular mask
serves every query block; padding slots are hidden by an additive per-slot mask (a float mask keeps
PyTorch's CPU flash kernel on its fast path). Cost per query: S * block keys, not every key before it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .._registry import config_for
from ..attention.cpu import cpu_attention
from .reference import check_args, query_blocks, select_blocks
from .space import KERNEL_NAME, default_config, problem


def cpu_sparse_attention(q, k, v, scale: float, q_offset: int, block: int, sinks: list[int], window: list[int],
                         topk: list[int], config: dict[str, Any] | None = None) -> torch.Tensor:
    args = (q, k, v, scale, q_offset, block, sinks, window, topk)
    B, Hq, Hkv, Lq, Lk, D = check_args(*args)
    if config is None:
        config = config_for(KERNEL_NAME, "cpu", problem(*args), "cpu", lambda: default_config(*args))
    # Heads whose sinks + window reach back to key block 0 read every causal block: exact attention,
    # so that one dense head does not make every head of the call pay for the widest pattern.
    last = (q_offset + Lq - 1) // block
    dense = [h for h in range(Hq) if sinks[h] + window[h] > last]
    if not dense:
        return _gathered(q, k, v, scale, q_offset, block, sinks, window, topk, int(config["CHUNK"]))
    if len(dense) == Hq:
        return cpu_attention(q, k, v, None, None, scale, True, 0, q_offset)
    out = torch.empty_like(q)
    group = Hq // Hkv
    for heads in (dense, [h for h in range(Hq) if h not in dense]):
        ix = torch.tensor(heads, device=q.device)
        qh, kh, vh = q.index_select(1, ix), k.index_select(1, ix // group), v.index_select(1, ix // group)
        if heads is dense:
            out[:, ix] = cpu_attention(qh, kh, vh, None, None, scale, True, 0, q_offset)
        else:
            pick = lambda xs: [xs[h] for h in heads]  # noqa: E731
            out[:, ix] = _gathered(qh, kh, vh, scale, q_offset, block, pick(sinks), pick(window), pick(topk),
                                   int(config["CHUNK"]))
    return out


def _gathered(q, k, v, scale: float, q_offset: int, block: int, sinks: list[int], window: list[int],
              topk: list[int], chunk: int) -> torch.Tensor:
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    sel = select_blocks(q, k, scale, q_offset, block, sinks, window, topk)
    first, nq, front = query_blocks(Lq, q_offset, block)
    nk = sel.shape[-1]
    S = int(sel.sum(-1).max())
    # Selected blocks by descending index: the diagonal (the largest selected index) comes first.
    rank = sel.to(torch.int16) * torch.arange(1, nk + 1, dtype=torch.int16, device=q.device)
    order, index = rank.topk(S, dim=-1)                                  # [B, Hq, nq, S]
    slot_bias = torch.zeros(order.shape, dtype=q.dtype, device=q.device).masked_fill_(order == 0, float("-inf"))
    slot_bias = slot_bias[..., None].expand(-1, -1, -1, -1, block).flatten(3)[..., None, :]  # [B, Hq, nq, 1, S*block]
    tri = torch.zeros(block, S * block, dtype=q.dtype, device=q.device)
    tri[:, :block].masked_fill_(torch.ones(block, block, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    # Rows of [B * Hkv * nk] blocks; query head h reads kv head h // group.
    pad_k = nk * block - Lk
    kb = F.pad(k, (0, 0, 0, pad_k)).reshape(B * Hkv * nk, block * D)
    vb = F.pad(v, (0, 0, 0, pad_k)).reshape(B * Hkv * nk, block * D)
    kv_head = (torch.arange(B, device=q.device)[:, None] * Hkv + torch.arange(Hq, device=q.device) // (Hq // Hkv))
    rows = (kv_head[:, :, None, None] * nk + index).reshape(B * Hq, nq, S)
    qb = F.pad(q, (0, 0, front, nq * block - front - Lq)).view(B * Hq, nq, block, D)
    out = torch.empty_like(qb)
    slot_bias = slot_bias.reshape(B * Hq, nq, 1, S * block)
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        ix = rows[:, c0:c1].reshape(-1)
        C = c1 - c0
        keys = kb.index_select(0, ix).view(B * Hq, C, S * block, D)
        vals = vb.index_select(0, ix).view(B * Hq, C, S * block, D)
        out[:, c0:c1] = F.scaled_dot_product_attention(qb[:, c0:c1], keys, vals, attn_mask=slot_bias[:, c0:c1] + tri,
                                                       scale=scale)
    return out.view(B, Hq, nq * block, D)[:, :, front:front + Lq].contiguous()
