"""`triton_attention`: masked scaled-dot-product attention, flash-attention-2 style (forward only).

1. `_prefill_kernel`, grid (cdiv(Lq, BLOCK_M), B*Hq): one query tile against its kv head (GQA: query
   head h reads kv head h // (Hq // Hkv)), online softmax in fp32 (running max m, sum l, acc) with
   exp2 and log2(e)*scale folded into one multiply. The KV loop visits only the key blocks that can
   hold a visible key ([lo, hi) from causal/window and the tile's positions), so work follows the
   mask's density (a 256 window at 8K reads ~6% of the tiles). Interior blocks that every query of
   the tile sees in full run without the element mask; only the boundary blocks pay for it.
2. `_split_kernel`, grid (SPLITS, B*Hkv*row_chunks), for Lq <= DECODE_MAX_LQ (generate steps): the
   rows of all query heads of one kv head (x Lq) are packed into one tile, so each K/V tile is read
   once per group, and the visible key range is cut into SPLITS slices to fill the machine. Each
   program leaves a partial (m, l, acc) in fp32; `_combine_kernel` merges them by log-sum-exp. With
   SPLITS == 1 the split kernel normalises and writes the output itself.
Masking: key j is visible to query i (at p = q_offset + i) iff (not causal or j <= p) and
(window == 0 or p - j < window) and key_padding[b, j]. A row that sees no key gives zeros.
Batch/head/row-block offsets are int64 (B*H*L*D can pass 2^31); offsets inside a tile stay int32.

On CPU tensors the kernels only run under Triton's interpreter, which `triton.jit` picks when the
kernels are defined: TRITON_INTERPRET=1 must be set before this module is first imported.
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .._registry import config_for
from .._triton import device_reason
from .space import KERNEL_NAME, TRITON_SPACE, problem
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634
DECODE_MAX_LQ = 16  # at most this many queries: the split-KV path
NUM_SMS = 132  # H100 SXM; the split heuristic aims to give every SM a program
H100_SMEM_BYTES = 232448  # max dynamic shared memory per block on sm_90 (227 KiB)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

SPACE = TRITON_SPACE  # defined beside the CPU space, so the tuner reads it without importing Triton


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _attend(acc, l_i, m_i, q, qpos, k_base, v_base, pad_base, start, end, Lk, window, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_PAD: tl.constexpr,
            PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold key blocks [start, end) (start a multiple of BLOCK_N) into the running (acc, l, m)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # The first block's row offset in int64 (start * stride can pass 2^31); per-block steps are small.
    row = tl.cast(start, tl.int64)
    k_ptrs = k_base + row * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + row * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    for s0 in range(start, end, BLOCK_N):
        kpos = s0 + offs_n
        if MASKED:
            in_k = kpos < Lk
            k = tl.load(k_ptrs, mask=in_k[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=in_k[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # log2 units
        if MASKED:
            visible = in_k[None, :]
            if CAUSAL:
                visible = visible & (kpos[None, :] <= qpos[:, None])
            if WINDOWED:
                visible = visible & (qpos[:, None] - kpos[None, :] < window)
            if HAS_PAD:
                real = tl.load(pad_base + kpos, mask=in_k, other=0)
                visible = visible & (real != 0)[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf: subtract 0 there, so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pad_ptr, Hq, GROUP, Lq, Lk, q_offset, window, qk_scale,
                    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
                    stride_pb,
                    CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Last query tile first: under a causal mask it has the most key blocks, so it should not be the
    # straggler that starts last.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hq).to(tl.int64)
    h = bh % Hq
    hk = (h // GROUP).to(tl.int64)
    offs = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    row0 = pid_m.to(tl.int64) * BLOCK_M
    q_ptrs = (q_ptr + b * stride_qb + h.to(tl.int64) * stride_qh + row0 * stride_qm
              + offs[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    qpos = q_offset + offs_m

    # Key blocks that can hold a visible key for some real row of the tile: [lo, hi).
    p_first = q_offset + pid_m * BLOCK_M
    p_last = q_offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, Lq) - 1
    lo = 0
    hi = Lk
    full_lo = 0  # from here every row's window holds the whole block
    full_hi = Lk // BLOCK_N * BLOCK_N  # below this every block is inside Lk and before every row
    if WINDOWED:
        lo = tl.maximum(p_first - window + 1, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(p_last - window + 1, 0), BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(hi, p_last + 1)
        full_hi = tl.minimum(full_hi, tl.maximum(p_first + 1, 0) // BLOCK_N * BLOCK_N)
    # Three runs: masked [lo, full_lo), unmasked [full_lo, full_hi), masked [full_hi, hi). Clamped so
    # they stay ordered: with no interior block the middle run is empty and the masked ones meet.
    if HAS_PAD:
        full_lo = hi  # padding can hide any key: every block masked
    full_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)

    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    pad_base = pad_ptr + b * stride_pb
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    strides = (stride_kn, stride_kd, stride_vn, stride_vd)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, qpos, k_base, v_base, pad_base, lo, full_lo, Lk, window, qk_scale,
                            *strides, True, CAUSAL, WINDOWED, HAS_PAD, PRECISION, HEAD_DIM, BLOCK_N)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, qpos, k_base, v_base, pad_base, full_lo, full_hi, Lk, window,
                            qk_scale, *strides, False, CAUSAL, WINDOWED, HAS_PAD, PRECISION, HEAD_DIM, BLOCK_N)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, qpos, k_base, v_base, pad_base, full_hi, hi, Lk, window, qk_scale,
                            *strides, True, CAUSAL, WINDOWED, HAS_PAD, PRECISION, HEAD_DIM, BLOCK_N)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key: acc is 0, so is the row
    o_ptrs = (o_ptr + b * stride_ob + h.to(tl.int64) * stride_oh + row0 * stride_om
              + offs[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, l_ptr, acc_ptr, pad_ptr,
                  Hq, Hkv, GROUP, Lq, Lk, q_offset, window, qk_scale, kv_lo, kv_hi, chunk, row_chunks,
                  stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd, stride_pb,
                  CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, HAS_PAD: tl.constexpr, PRECISION: tl.constexpr,
                  DIRECT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    split = tl.program_id(0)
    pid = tl.program_id(1)
    bk = pid // row_chunks
    b = (bk // Hkv).to(tl.int64)
    hk = (bk % Hkv).to(tl.int64)
    # Row r of this kv head's GROUP*Lq (query head, query) rows: head hk*GROUP + r // Lq, query r % Lq.
    r = (pid % row_chunks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * Lq
    h = hk * GROUP + (r // Lq)  # int64 vector
    i = r % Lq
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = q_ptr + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    qpos = q_offset + i

    # This split's slice of the visible range; slices start on block boundaries so no key is counted
    # twice, and keys past kv_hi are hidden by the causal mask or Lk anyway.
    start = kv_lo + split * chunk
    end = tl.minimum(start + chunk, kv_hi)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    # Memory-bound: the element mask on every block costs nothing worth a separate interior run.
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, qpos, k_ptr + b * stride_kb + hk * stride_kh,
                            v_ptr + b * stride_vb + hk * stride_vh, pad_ptr + b * stride_pb, start, end, Lk,
                            window, qk_scale, stride_kn, stride_kd, stride_vn, stride_vd,
                            True, CAUSAL, WINDOWED, HAS_PAD, PRECISION, HEAD_DIM, BLOCK_N)
    row = (b * Hq + h) * Lq + i  # [B, Hq, Lq] row index, int64
    if DIRECT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        nsplit = tl.num_programs(0)
        part = row * nsplit + split
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _combine_kernel(o_ptr, m_ptr, l_ptr, acc_ptr, SPLITS, HEAD_DIM: tl.constexpr, SPLITS_P2: tl.constexpr):
    # One output row: out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, with M = max_s m_s.
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < SPLITS
    m = tl.load(m_ptr + row * SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + row * SPLITS + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(acc_ptr + (row * SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None],
                  other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits: m = -inf, weight 0
    total = tl.sum(w * l, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(o_ptr + row * HEAD_DIM + offs_d, out.to(o_ptr.dtype.element_ty))


# Whether `triton.jit` built the kernels for the interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = isinstance(_prefill_kernel, InterpretedFunction)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def visible_range(Lq: int, Lk: int, causal: bool, window: int, q_offset: int) -> tuple[int, int]:
    """[lo, hi): the keys some query of the call can see (padding aside); empty when hi <= lo."""
    lo = max(0, q_offset - window + 1) if window else 0
    hi = min(Lk, q_offset + Lq) if causal else Lk
    return lo, hi


def smem_bytes(cfg: dict[str, Any], D: int, dtype: torch.dtype) -> int:
    """Shared memory of the pipelined KV loop: the Q tile, plus a K and a V tile per stage."""
    elt = torch.empty((), dtype=dtype).element_size()
    return (cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"]) * D * elt


def config_fits(cfg: dict[str, Any], D: int, dtype: torch.dtype, smem: int = H100_SMEM_BYTES,
                Lq: int | None = None) -> bool:
    """False for configs that cannot launch (shared memory) or spill (registers).

    With `Lq` given, prefill problems keep only SPLITS=1 (the knob means nothing to them).
    """
    if smem_bytes(cfg, D, dtype) > smem:
        return False
    if Lq is not None and Lq > DECODE_MAX_LQ and cfg.get("SPLITS", 1) != 1:
        return False
    # fp32 acc (BLOCK_M x D) and scores (BLOCK_M x BLOCK_N) over num_warps*32 threads: past ~256
    # floats a thread they spill.
    return cfg["BLOCK_M"] * (D + cfg["BLOCK_N"]) // (cfg["num_warps"] * 32) <= 256


def default_splits(B: int, Hkv: int, row_chunks: int, visible: int, block_n: int) -> int:
    """Enough KV slices that B*Hkv*row_chunks*SPLITS programs cover the SMs (at most one per block,
    at most SPACE's largest)."""
    most = max(SPACE["SPLITS"])
    return max(1, min(triton.cdiv(max(visible, 1), block_n), NUM_SMS // max(1, B * Hkv * row_chunks), most))


def _decode_block_m(cfg_block_m: int, group: int, Lq: int) -> int:
    # The packed rows (a kv head's query heads x queries), capped by the config's BLOCK_M.
    return max(16, min(cfg_block_m, _next_pow2(group * Lq)))


def default_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, window: int,
                   q_offset: int, key_padding: torch.Tensor | None) -> dict[str, Any]:
    """Heuristic tiles when nothing is tuned (the flash-attention tutorial's H100 choices)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    wide = q.dtype == torch.float32  # fp32 tiles cost twice the shared memory and registers
    if Lq <= DECODE_MAX_LQ:
        cfg = _shrink_to_fit({"BLOCK_M": 64, "BLOCK_N": 32 if wide else 64, "num_warps": 4,
                              "num_stages": 2 if wide else 3}, D, q.dtype)
        bm = _decode_block_m(cfg["BLOCK_M"], Hq // Hkv, Lq)
        lo, hi = visible_range(Lq, Lk, causal, window, q_offset)
        cfg["SPLITS"] = default_splits(B, Hkv, triton.cdiv(Hq // Hkv * Lq, bm), hi - lo, cfg["BLOCK_N"])
        return cfg
    if wide:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    elif D <= 64:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    # Too few query tiles to cover the SMs: halve them (short prompts, small batches).
    if cfg["BLOCK_M"] > 64 and B * Hq * triton.cdiv(Lq, cfg["BLOCK_M"]) < NUM_SMS:
        cfg["BLOCK_M"] = 64
    # Narrow problems (tests): no tile wider than what it covers.
    cfg["BLOCK_M"] = min(cfg["BLOCK_M"], max(16, _next_pow2(Lq)))
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, _next_pow2(Lk)))
    cfg["SPLITS"] = 1
    return _shrink_to_fit(cfg, D, q.dtype)


def _shrink_to_fit(cfg: dict[str, Any], D: int, dtype: torch.dtype) -> dict[str, Any]:
    # Wide heads (D=256, fp32): fewer stages, then narrower key blocks, then fewer query rows.
    for knob, floor in (("num_stages", 2), ("BLOCK_N", 32), ("BLOCK_M", 64), ("num_stages", 1), ("BLOCK_N", 16)):
        while not config_fits(cfg, D, dtype) and cfg[knob] > floor:
            cfg[knob] = cfg[knob] // 2 if knob != "num_stages" else cfg[knob] - 1
    return cfg


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, window: int,
             q_offset: int, key_padding: torch.Tensor | None) -> str | None:
    """None when the kernels can run these arguments, else why not."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"q, k, v must be 4-D [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [B={B}, Hkv, Lk, D={D}]"
    if k.shape[1] == 0 or Hq % k.shape[1]:
        return f"query heads {Hq} are not a multiple of kv heads {k.shape[1]}"
    if D & (D - 1) or not 16 <= D <= 256:
        return f"head dim {D} is not a power of two in 16..256"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes ({q.dtype}, {k.dtype}, {v.dtype}) must be one of {DTYPES}, all the same"
    if window < 0:
        return f"window {window} is negative"
    if key_padding is not None and (key_padding.dtype != torch.bool or tuple(key_padding.shape) != (B, k.shape[2])):
        return f"key_padding must be bool [B={B}, Lk={k.shape[2]}], got {key_padding.dtype} {tuple(key_padding.shape)}"
    tensors = (q, k, v) if key_padding is None else (q, k, v, key_padding)
    return device_reason(tensors, INTERPRETED, __name__)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool, window: int,
                     q_offset: int, key_padding: torch.Tensor | None,
                     config: dict[str, Any] | None = None) -> torch.Tensor:
    """Masked attention [B, Hq, Lq, D] in q's dtype; `config` holds BLOCK_M/N, num_warps, num_stages, SPLITS."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out_dtype = q.dtype
    lo, hi = visible_range(Lq, Lk, causal, window, q_offset)
    if q.numel() == 0 or hi <= lo:
        return q.new_zeros(B, Hq, Lq, D)  # nothing visible anywhere: every row is zeros
    out = q.new_empty(B, Hq, Lq, D)  # every row is written, zeros included
    if config is None:
        args = (q, k, v, key_padding, None, scale, causal, window, q_offset)  # the op's argument order
        config = config_for(KERNEL_NAME, "triton", problem(*args), q.device.type,
                            lambda: default_config(q, k, v, scale, causal, window, q_offset, key_padding))
    if INTERPRETED and q.dtype == torch.bfloat16:
        # The interpreter computes with numpy, which has no bfloat16 (it holds bf16 as raw uint16
        # bits, so tl.dot would multiply integers): run in fp32 and round the result once.
        q, k, v = q.float(), k.float(), v.float()
        out = out.float()
    # fp32 inputs stay exact ("ieee", as the reference); the setting means nothing for 16-bit inputs.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    bn = config["BLOCK_N"]
    launch = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    has_pad = key_padding is not None
    # bool storage is one byte: read it as uint8 in place (no copy); a dummy pointer when absent.
    pad = key_padding.view(torch.uint8) if has_pad else out
    stride_pb = key_padding.stride(0) if has_pad else 0
    if has_pad and key_padding.stride(1) != 1:
        pad = pad.contiguous()
        stride_pb = pad.stride(0)
    group = Hq // Hkv
    flags = dict(CAUSAL=bool(causal), WINDOWED=window > 0, HAS_PAD=has_pad, PRECISION=precision, HEAD_DIM=D)
    qk_scale = float(scale) * LOG2E
    window = int(window)

    if Lq > DECODE_MAX_LQ:
        bm = config["BLOCK_M"]
        _prefill_kernel[(triton.cdiv(Lq, bm), B * Hq)](
            q, k, v, out, pad, Hq, group, Lq, Lk, int(q_offset), window, qk_scale,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), stride_pb,
            **flags, BLOCK_M=bm, BLOCK_N=bn, **launch)
        return out.to(out_dtype)

    bm = _decode_block_m(config["BLOCK_M"], group, Lq)
    row_chunks = triton.cdiv(group * Lq, bm)
    kv_lo = lo // bn * bn
    blocks = triton.cdiv(hi - kv_lo, bn)
    splits = config.get("SPLITS") or default_splits(B, Hkv, row_chunks, hi - kv_lo, bn)
    chunk = triton.cdiv(blocks, min(splits, blocks)) * bn
    splits = triton.cdiv(hi - kv_lo, chunk)  # no empty slices
    direct = splits == 1
    if direct:
        m = l = acc = out  # unused
    else:
        rows = B * Hq * Lq
        m = torch.empty(rows * splits, dtype=torch.float32, device=q.device)
        l = torch.empty_like(m)
        acc = torch.empty(rows * splits * D, dtype=torch.float32, device=q.device)
    _split_kernel[(splits, B * Hkv * row_chunks)](
        q, k, v, out, m, l, acc, pad, Hq, Hkv, group, Lq, Lk, int(q_offset), window, qk_scale,
        kv_lo, hi, chunk, row_chunks, *q.stride(), *k.stride(), *v.stride(), stride_pb,
        **flags, DIRECT=direct, BLOCK_M=bm, BLOCK_N=bn, **launch)
    if not direct:
        _combine_kernel[(B * Hq * Lq,)](out, m, l, acc, splits, HEAD_DIM=D,
                                        SPLITS_P2=max(2, _next_pow2(splits)), num_warps=4 if D >= 128 else 2)
    return out.to(out_dtype)
