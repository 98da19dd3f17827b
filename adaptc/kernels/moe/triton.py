"""`triton_fused_moe`: sorted, block-aligned grouped GEMMs for Mixture-of-Experts (the vLLM recipe).

1. `align_blocks`: the T*K (token, expert) pairs are sorted by expert and each expert's run is
   padded to a multiple of BLOCK_M with a sentinel, so every BLOCK_M block of rows belongs to one
   expert. Sizes come from a fixed upper bound: no host sync, so it can be captured in a CUDA graph.
2. `_up_kernel`: per block, rows gathered from the hidden states times that expert's gate and up
   tiles, two fp32 accumulators, activation and product fused; writes h [rows, I].
3. `_down_kernel`: h times the expert's down tile; the routing weight scales the result in the
   epilogue; each row lands at its pair's slot, then one sum over K reduces pairs per token.
Expert weights are read in place through their strides (any layout): never copied per call.

On CPU tensors the kernels only run under Triton's interpreter, which `triton.jit` picks when the
kernels are defined: TRITON_INTERPRET=1 must be set before this module is first imported.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .._registry import config_for
from .._triton import device_reason
from .space import KERNEL_NAME, moe_dims, problem, triton_default_config

ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


def align_blocks(topk_ids: torch.Tensor, E: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pair ids with sentinel S = T*K in the padding, expert id per BLOCK_M block; E = none).

    At most min(E, S) experts are hit and each pads by under BLOCK_M rows, so S + min(E, S) *
    (BLOCK_M - 1) rows always suffice; blocks past the last expert's run get expert E (skipped).
    """
    flat = topk_ids.reshape(-1).long()
    S = flat.numel()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(S, device=flat.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    capacity = triton.cdiv(S + min(E, S) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((capacity,), S, dtype=torch.int64, device=flat.device)
    sorted_ids[(ends - padded)[expert_of] + rank] = order
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_starts, right=True)
    return sorted_ids, block_expert


@triton.jit
def _block_coords(num_m, num_n, GROUP_M: tl.constexpr):
    # Grouped ordering: GROUP_M row blocks share each column tile while it is in L2.
    pid = tl.program_id(0)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size, (pid % in_group) // size


@triton.jit
def _block_rows(sorted_ids_ptr, pid_m, S, BLOCK_M: tl.constexpr):
    # The block's sorted rows (int64: rows * I can pass 2^31), the pair each holds, which are real.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    return offs_m, pair, pair < S


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return x * tl.sigmoid(x)
    elif ACT == 1:  # gelu, exact (erf)
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:  # gelu, tanh approximation; tanh(u) = 2 sigmoid(2u) - 1 needs no libdevice
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    else:  # relu
        return tl.maximum(x, 0.0)


@triton.jit
def _up_kernel(x_ptr, w_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr, num_m, S, E, N, K,
               stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_hm,
               TOPK: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = _block_coords(num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:
        return
    offs_m, pair, valid = _block_rows(sorted_ids_ptr, pid_m, S, BLOCK_M)
    token = pair // TOPK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # Within one expert's matrix offsets stay int32 (fewer than 2^31 elements); across experts int64.
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    up_offset = N * stride_wn  # the up rows sit N rows below the gate rows of the same expert
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & (offs_n[None, :] < N)
        acc_gate = tl.dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc_gate, input_precision=PRECISION)
        if GATED:
            acc_up = tl.dot(a, tl.load(b_ptrs + up_offset, mask=b_mask, other=0.0), acc_up,
                            input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk
    h = _activation(acc_gate, ACT)
    if GATED:
        h = h * acc_up
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit
def _down_kernel(h_ptr, w_ptr, out_ptr, weights_ptr, sorted_ids_ptr, block_expert_ptr, num_m, S, E, N, K,
                 stride_hm, stride_we, stride_wn, stride_wk, stride_om,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid_m, pid_n = _block_coords(num_m, tl.cdiv(N, BLOCK_N), GROUP_M)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:
        return
    offs_m, pair, valid = _block_rows(sorted_ids_ptr, pid_m, S, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :]
    b_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0)[:, None]  # routing weight, fp32
    out_ptrs = out_ptr + pair[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=valid[:, None] & (offs_n[None, :] < N))


# Whether `triton.jit` built the kernels for the interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = isinstance(_up_kernel, InterpretedFunction)


def supports(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool) -> str | None:
    """None when the kernels can run these arguments, else why not."""
    return device_reason((hidden, topk_weights, topk_ids, w13, w2), INTERPRETED, __name__)


def triton_fused_moe(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool,
                     config: dict[str, Any] | None = None) -> torch.Tensor:
    """Same contract as `torch_fused_moe`; `config` holds BLOCK_M/N/K, GROUP_M, num_warps, num_stages."""
    args = (hidden, topk_weights, topk_ids, w13, w2, activation, gated)
    T, H, I, E, K = moe_dims(*args)
    if T == 0:
        return hidden.new_zeros(0, H)
    if config is None:
        config = config_for(KERNEL_NAME, "triton", problem(*args), hidden.device.type,
                            lambda: triton_default_config(T, H, I, E, K, hidden.dtype, gated))
    dtype = hidden.dtype
    if INTERPRETED and dtype == torch.bfloat16:
        # The interpreter computes with numpy, which has no bfloat16 (it holds bf16 as raw uint16
        # bits, so tl.dot would multiply integers): run in fp32 and round the result once.
        hidden, w13, w2 = hidden.float(), w13.float(), w2.float()
    bm, bn, bk, gm = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["GROUP_M"]
    launch = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    # fp32 inputs stay exact ("ieee", as the reference); the setting means nothing for 16-bit inputs.
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    sorted_ids, block_expert = align_blocks(topk_ids, E, bm)
    num_m, S = block_expert.numel(), T * K
    h = hidden.new_empty(sorted_ids.numel(), I)  # by sorted row; padding rows are never written
    _up_kernel[(num_m * triton.cdiv(I, bn),)](
        hidden, w13, h, sorted_ids, block_expert, num_m, S, E, I, H,
        hidden.stride(0), hidden.stride(1), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        TOPK=K, GATED=gated, ACT=ACT_IDS[activation], PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, **launch)
    pairs = torch.empty(S, H, dtype=torch.float32, device=hidden.device)  # by pair id: every row written
    weights = topk_weights.reshape(-1).float().contiguous()
    _down_kernel[(num_m * triton.cdiv(H, bn),)](
        h, w2, pairs, weights, sorted_ids, block_expert, num_m, S, E, H, I,
        h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), pairs.stride(0),
        PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, **launch)
    return pairs.view(T, K, H).sum(dim=1).to(dtype)
