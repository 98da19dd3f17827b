"""`triton_sparse_attention`: one program per (query block, batch x head) visits only its selected key blocks.

The selection comes from `select_blocks` (shared with the reference and the CPU implementation), laid
out as [B, Hq, query blocks, S] key-block indices (-1 = unused slot). Each program folds its blocks
into a flash-attention online softmax with the exact kernel's `_attend` (causal masking inside the
block; GQA by head // group), so work is S blocks per query block, not every block before it.
Forward only. On CPU tensors it runs only under TRITON_INTERPRET=1 (set before import).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .._registry import config_for
from .._triton import device_reason
from ..attention.triton import DTYPES, INTERPRETED, LOG2E, _attend
from .reference import query_blocks, select_blocks
from .space import KERNEL_NAME, problem, triton_default_config


@triton.jit
def _sparse_kernel(q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, Hq, GROUP, S, Lq, Lk, q_offset, front, qk_scale,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                   PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_q = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    offs_m = pid_q * BLOCK - front + tl.arange(0, BLOCK)  # the query block's rows (the first may start early)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m >= 0) & (offs_m < Lq)
    rows = tl.where(row_ok, offs_m, 0).to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h.to(tl.int64) * stride_qh + rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    qpos = q_offset + offs_m
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    acc = tl.zeros((BLOCK, HEAD_DIM), dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    slots = idx_ptr + (bh.to(tl.int64) * tl.num_programs(0) + pid_q) * S
    for s in range(S):
        blk = tl.load(slots + s)
        if blk >= 0:
            start = blk * BLOCK
            acc, l_i, m_i = _attend(acc, l_i, m_i, q, qpos, k_base, v_base, k_base, start, start + BLOCK, Lk, 0,
                                    qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                                    True, True, False, False, PRECISION, HEAD_DIM, BLOCK_N)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(o_ptr + b * stride_ob + h.to(tl.int64) * stride_oh + rows[:, None] * stride_om
             + offs_d[None, :] * stride_od, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def supports(q, k, v, scale, q_offset, block, sinks, window, topk) -> str | None:
    D = q.shape[-1]
    if D & (D - 1) or not 16 <= D <= 256:
        return f"head dim {D} is not a power of two in 16..256"
    if block & (block - 1) or not 16 <= block <= 128:
        return f"block {block} is not a power of two in 16..128 (the query tile is one block)"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes ({q.dtype}, {k.dtype}, {v.dtype}) must be one of {DTYPES}, all the same"
    return device_reason((q, k, v), INTERPRETED, __name__)


def triton_sparse_attention(q, k, v, scale: float, q_offset: int, block: int, sinks: list[int], window: list[int],
                            topk: list[int], config: dict[str, Any] | None = None) -> torch.Tensor:
    args = (q, k, v, scale, q_offset, block, sinks, window, topk)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if config is None:
        config = config_for(KERNEL_NAME, "triton", problem(*args), q.device.type, lambda: triton_default_config(*args))
    sel = select_blocks(*args[:2], scale, q_offset, block, sinks, window, topk)
    first, nq, front = query_blocks(Lq, q_offset, block)
    S = int(sel.sum(-1).max())
    nk = sel.shape[-1]
    rank = sel.to(torch.int32) * torch.arange(1, nk + 1, dtype=torch.int32, device=q.device)
    order, index = rank.topk(S, dim=-1)
    index = torch.where(order > 0, index, -1).to(torch.int32).contiguous()  # [B, Hq, nq, S]
    out_dtype = q.dtype
    if INTERPRETED and q.dtype == torch.bfloat16:  # numpy has no bfloat16 (see attention/triton.py)
        q, k, v = q.float(), k.float(), v.float()
    out = torch.empty_like(q)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _sparse_kernel[(nq, B * Hq)](
        q, k, v, out, index, Hq, Hq // Hkv, S, Lq, Lk, int(q_offset), front, float(scale) * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        PRECISION=precision, HEAD_DIM=D, BLOCK=block, BLOCK_N=config["BLOCK_N"],
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out.to(out_dtype)
