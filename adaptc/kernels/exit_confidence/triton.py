"""`triton_exit_confidence`: softmax confidence of an LM head by an online reduction over vocabulary tiles.

1. `_partial_kernel`, grid (cdiv(N, BLOCK_M), SPLITS): a block of hidden rows against one slice of the
   vocabulary. Each [BLOCK_M, BLOCK_V] logit tile is a K-loop of `tl.dot` over D with fp32
   accumulation (plus the bias), reduced at once to its top-1 logit and index (leftmost among equal
   maxima), top-2 logit and sum of exp(logit - top-1); those fold into running values per row, rescaled
   when the maximum moves. No logit leaves the registers. With SPLITS == 1 the program writes the final
   (max_prob, margin, top1); else it leaves fp32 partials (top1, top2, sumexp) and an index.
2. `_combine_kernel`, grid (cdiv(N, BLOCK),): folds the SPLITS partials of each row in vocabulary order
   (so ties still go to the lowest index) and writes the outputs. It reads 16 bytes per row and split:
   next to the weight (V x D) the partial kernel streams, it is free.
Splitting the vocabulary is what lets a decode step (N = 1: one row block) occupy every SM; the weight
is then read once in total, which is the floor for this op at small N.

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
from .reference import DTYPES
from .space import KERNEL_NAME, TRITON_SPACE, problem

NUM_SMS_DEFAULT = 132  # H100 SXM, for CPU tensors under the interpreter


@triton.jit
def _fold(t1, t2, i1, s, c1, c2, j1, cs):
    """Fold a later tile's (top-1 c1 at j1, top-2 c2, sumexp cs rel. to c1) into the running values.
    A tie keeps the running top-1: it came from lower indices."""
    later = c1 > t1
    new1 = tl.where(later, c1, t1)
    new2 = tl.where(later, tl.maximum(t1, c2), tl.maximum(t2, c1))
    new_i = tl.where(later, j1, i1)
    # exp(-inf - finite) = 0 covers the first tile; every folded tile has a finite maximum.
    new_s = s * tl.exp(t1 - new1) + cs * tl.exp(c1 - new1)
    return new1, new2, new_i, new_s


@triton.jit
def _finish(t1, t2, s):
    prob = 1.0 / s
    return prob, prob * (1.0 - tl.exp(t2 - t1))


@triton.jit
def _partial_kernel(h_ptr, w_ptr, b_ptr, prob_ptr, margin_ptr, top1_ptr, pt1_ptr, pt2_ptr, ps_ptr,
                    N, V, D, chunk, stride_hn, stride_hd, stride_wv, stride_wd,
                    HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    offs_v = tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    v_lo = split * chunk
    v_hi = tl.minimum(v_lo + chunk, V)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hn

    t1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    t2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    i1 = tl.zeros([BLOCK_M], tl.int32)
    s = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + offs_v
        col_ok = cols < v_hi
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wv  # V * D can pass 2^31
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            h = tl.load(h_rows + d[None, :] * stride_hd, mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
            w = tl.load(w_cols + d[:, None] * stride_wd, mask=col_ok[None, :] & (d[:, None] < D), other=0.0)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        c1 = tl.max(acc, 1)
        at = tl.argmax(acc, 1, tie_break_left=True)
        c2 = tl.max(tl.where(offs_v[None, :] == at[:, None], float("-inf"), acc), 1)
        cs = tl.sum(tl.exp(acc - c1[:, None]), 1)
        t1, t2, i1, s = _fold(t1, t2, i1, s, c1, c2, at + v0, cs)

    if DIRECT:
        prob, margin = _finish(t1, t2, s)
        tl.store(prob_ptr + rows, prob, mask=row_ok)
        tl.store(margin_ptr + rows, margin, mask=row_ok)
        tl.store(top1_ptr + rows, i1.to(tl.int64), mask=row_ok)
    else:
        part = split * N + rows
        tl.store(pt1_ptr + part, t1, mask=row_ok)
        tl.store(pt2_ptr + part, t2, mask=row_ok)
        tl.store(ps_ptr + part, s, mask=row_ok)
        tl.store(top1_ptr + part, i1.to(tl.int64), mask=row_ok)


@triton.jit
def _combine_kernel(prob_ptr, margin_ptr, top1_ptr, pt1_ptr, pt2_ptr, ps_ptr, pi_ptr, N, SPLITS,
                    BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    t1 = tl.load(pt1_ptr + rows, mask=ok, other=0.0)
    t2 = tl.load(pt2_ptr + rows, mask=ok, other=0.0)
    s = tl.load(ps_ptr + rows, mask=ok, other=1.0)
    i1 = tl.load(pi_ptr + rows, mask=ok, other=0)
    for sp in range(1, SPLITS):
        part = sp * N + rows
        c1 = tl.load(pt1_ptr + part, mask=ok, other=0.0)
        c2 = tl.load(pt2_ptr + part, mask=ok, other=0.0)
        cs = tl.load(ps_ptr + part, mask=ok, other=1.0)
        j1 = tl.load(pi_ptr + part, mask=ok, other=0)
        t1, t2, i1, s = _fold(t1, t2, i1, s, c1, c2, j1, cs)
    prob, margin = _finish(t1, t2, s)
    tl.store(prob_ptr + rows, prob, mask=ok)
    tl.store(margin_ptr + rows, margin, mask=ok)
    tl.store(top1_ptr + rows, i1, mask=ok)


# Whether `triton.jit` built the kernels for the interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = isinstance(_partial_kernel, InterpretedFunction)
SPACE = TRITON_SPACE


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return NUM_SMS_DEFAULT
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(N: int, V: int, block_m: int, block_v: int, num_sms: int) -> int:
    """A power of two (from SPACE) giving about two programs per SM, at most one slice per vocab tile."""
    want = triton.cdiv(2 * num_sms, triton.cdiv(max(N, 1), block_m))
    most = min(max(SPACE["SPLITS"]), triton.cdiv(V, block_v), want)
    return max(1, 1 << (most.bit_length() - 1)) if most >= 1 else 1


def default_config(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> dict[str, Any]:
    """Heuristic tiles when nothing is tuned: decode rows pad to the 16-row minimum of tl.dot; the
    vocabulary is split until the row blocks x slices cover the SMs twice."""
    N, (V, D) = hidden.shape[0], weight.shape
    wide = weight.dtype == torch.float32  # fp32 tiles cost twice the shared memory
    cfg = {"BLOCK_M": min(64, max(16, _next_pow2(N))), "BLOCK_V": 64 if wide else 128,
           "BLOCK_D": 64 if wide or D <= 64 else 128, "num_warps": 4, "num_stages": 2 if wide else 3}
    if cfg["BLOCK_M"] * cfg["BLOCK_V"] // (cfg["num_warps"] * 32) > 128:
        cfg["num_warps"] = 8
    cfg["SPLITS"] = default_splits(N, V, cfg["BLOCK_M"], cfg["BLOCK_V"], _num_sms(weight.device))
    return cfg


def supports(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str | None:
    """None when the kernels can run these arguments, else why not."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        return f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, D] and [V, D]"
    if weight.dtype not in DTYPES or hidden.dtype != weight.dtype:
        return f"hidden and weight must share one dtype of {DTYPES}; got {hidden.dtype} and {weight.dtype}"
    if weight.shape[0] >= 2 ** 31:
        return f"vocabulary {weight.shape[0]} does not fit int32 tile indices"
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    return device_reason(tensors, INTERPRETED, __name__)


def triton_exit_confidence(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                           config: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max_prob [N] fp32, margin [N] fp32, top1 [N] int64); `config` holds BLOCK_M/V/D, num_warps,
    num_stages and SPLITS."""
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    prob = torch.empty(N, dtype=torch.float32, device=device)
    margin = torch.empty_like(prob)
    top1 = torch.empty(N, dtype=torch.int64, device=device)
    if N == 0:
        return prob, margin, top1
    if config is None:
        config = config_for(KERNEL_NAME, "triton", problem(hidden, weight, bias), device.type,
                            lambda: default_config(hidden, weight, bias))
    if INTERPRETED and weight.dtype == torch.bfloat16:
        # The interpreter computes with numpy, which has no bfloat16 (it holds bf16 as raw uint16 bits,
        # so tl.dot would multiply integers): upcast exactly to fp32 first.
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    # fp32 inputs stay exact ("ieee", as the reference); the setting means nothing for 16-bit inputs.
    precision = "ieee" if weight.dtype == torch.float32 else "tf32"
    bm, bv = config["BLOCK_M"], config["BLOCK_V"]
    tiles = triton.cdiv(V, bv)
    splits = max(1, min(int(config["SPLITS"]), tiles))
    chunk = triton.cdiv(tiles, splits) * bv
    splits = triton.cdiv(V, chunk)  # no empty slices
    direct = splits == 1
    if direct:
        pt1 = pt2 = ps = prob  # unused
        pidx = top1
    else:
        pt1 = torch.empty(splits * N, dtype=torch.float32, device=device)
        pt2 = torch.empty_like(pt1)
        ps = torch.empty_like(pt1)
        pidx = torch.empty(splits * N, dtype=torch.int64, device=device)
    b = bias.contiguous() if bias is not None else prob  # a dummy pointer when absent
    _partial_kernel[(triton.cdiv(N, bm), splits)](
        hidden, weight, b, prob, margin, pidx, pt1, pt2, ps, N, V, D, chunk,
        *hidden.stride(), *weight.stride(),
        HAS_BIAS=bias is not None, DIRECT=direct, PRECISION=precision,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_D=config["BLOCK_D"],
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    if not direct:
        block = min(1024, max(32, _next_pow2(N)))
        _combine_kernel[(triton.cdiv(N, block),)](prob, margin, top1, pt1, pt2, ps, pidx, N, splits,
                                                  BLOCK=block, num_warps=4)
    return prob, margin, top1
