"""`cpu_fused_moe`: sorted, grouped MoE on the CPU with MKL GEMMs per hit expert.

One stable argsort groups the T*K (token, expert) pairs by expert, one bincount (the only host
sync) gives each expert's row range, and one gather lays the hidden rows out in that order. Each
hit expert then runs two GEMMs on its contiguous rows against its own weight matrix, viewed in
place (no per-token copies of weights, no one_hot or where per expert).

Layout "wx" computes W @ x^T: for the few rows per expert that decode and small prefill give,
MKL streams a [N, H] weight far faster (2-3x measured on 2 cores) as the left operand than as a
transposed right operand, and the gate/up halves and the down projection's input then stay
contiguous row blocks. "xw" is the nn.functional.linear layout, for the tuner to weigh at large T.

With few rows per expert (decode, small prefill) MKL leaves cores idle: a GEMV runs on one core
whatever the thread count, and a GEMM on 2-3 columns streams the weight at half a GEMV's speed
(measured on 2 cores). Three knobs answer that. "workers" deals the experts over that many threads,
each streaming its own weights. "gemv_rows" runs an expert with that few rows as one GEMV per row
(the second pass over the weight mostly hits cache). "split", for a lone expert, cuts the gate/up
weight into row blocks run as one batched GEMM, which MKL spreads over every core; not the down
projection, whose unit-stride input column sends MKL's batched path to a kernel 4x slower.
"""
from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import Any

import torch

from .._registry import config_for
from .space import KERNEL_NAME, cpu_default_config, moe_dims, problem


def _act_(x: torch.Tensor, activation: str) -> torch.Tensor:
    """Apply the activation in place (x is a fresh GEMM output or a view of one)."""
    if activation == "silu":
        return torch.ops.aten.silu_(x)
    if activation == "gelu":
        return torch.ops.aten.gelu_(x)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_(x, approximate="tanh")
    if activation == "relu":
        return torch.ops.aten.relu_(x)
    raise ValueError(f"unknown activation {activation!r}")


def cpu_fused_moe(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool,
                  config: dict[str, Any] | None = None) -> torch.Tensor:
    """Same contract as `torch_fused_moe`; `config` holds the CPU knobs of `space.CPU_SPACE`."""
    args = (hidden, topk_weights, topk_ids, w13, w2, activation, gated)
    T, H, I, E, K = moe_dims(*args)
    if config is None:
        config = config_for(KERNEL_NAME, "cpu", problem(*args), "cpu", lambda: cpu_default_config(T, H, I, E, K, hidden.dtype, gated))
    if T == 0:
        return hidden.new_zeros(0, H)
    if config.get("algorithm", "loop") == "grouped_mm":
        return _grouped_mm_moe(*args)
    wx = config.get("layout", "wx") == "wx"
    pair_buffer = config.get("combine", "pair_sum") == "pair_sum"
    row_pad = int(config.get("row_pad", 1))
    split = int(config.get("split", 1))
    gemv_rows = int(config.get("gemv_rows", 0))
    workers = int(config.get("workers", 1)) if pair_buffer else 1
    fp32 = hidden.dtype == torch.float32

    S = T * K
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=E).tolist()  # the one host sync
    token_sorted = order // K if K > 1 else order
    # Rows grouped by expert, plus row_pad - 1 zero rows at the end: a padded expert's GEMM reads
    # into the next expert's rows (or these), and its extra output columns are dropped.
    x_sorted = hidden.new_empty(S + row_pad - 1, H)
    torch.index_select(hidden, 0, token_sorted, out=x_sorted[:S])
    x_sorted[S:].zero_()
    w_sorted = topk_weights.reshape(-1).index_select(0, order).float()  # [S]
    w_sorted = torch.cat([w_sorted, w_sorted.new_zeros(row_pad - 1)])
    w_cast = w_sorted if fp32 else w_sorted.to(hidden.dtype)
    # Fold the routing weight into whichever of h [rows, I] and y [rows, H] is smaller (fp32 only:
    # in half precision the reference weights y in fp32, so do the same).
    weight_h = fp32 and I <= H

    out = None if pair_buffer else torch.zeros(T, H, dtype=torch.float32)
    pairs = torch.empty(S, H, dtype=torch.float32) if pair_buffer else None

    def run_expert(e: int, start: int, n: int) -> None:
        stop, padded = start + n, start + -(-n // row_pad) * row_pad
        x = x_sorted[start:padded]
        if wx:
            g = _w_at(w13[e], x.t(), split, gemv_rows)   # [2I or I, rows]
            h = g[:I]
            _act_(h, activation)
            if gated:
                h.mul_(g[I:])
            if weight_h:
                h.mul_(w_cast[start:padded])
            y = _w_at(w2[e], h, 1, gemv_rows).t()[:n]    # [n, H], a transposed view
        else:
            g = torch.mm(x, w13[e].t())                  # [rows, 2I or I]
            h = g[:, :I]
            _act_(h, activation)
            if gated:
                h.mul_(g[:, I:])
            if weight_h:
                h.mul_(w_cast[start:padded, None])
            y = torch.mm(h, w2[e].t())[:n]               # [n, H]
        if not weight_h:
            y = y.float().mul_(w_sorted[start:stop, None]) if not fp32 else y.mul_(w_sorted[start:stop, None])
        if pair_buffer:
            pairs[start:stop].copy_(y)
        else:
            out.index_add_(0, token_sorted[start:stop], y)

    starts = itertools.accumulate(counts, initial=0)
    work = sorted(((n, e, start) for e, (start, n) in enumerate(zip(starts, counts)) if n), reverse=True)
    if workers > 1 and len(work) > 1:
        # Experts dealt over threads, busiest first (torch ops release the GIL): a GEMV on a few
        # rows runs on one core, so a thread per core streams weights in parallel. Each thread
        # writes its own experts' pair rows. Grad and inference mode are per thread: a worker takes the
        # caller's inference mode (its buffers are inference tensors under it) and never records autograd.
        inference = torch.is_inference_mode_enabled()

        def run_part(part: list[tuple[int, int, int]]) -> None:
            with torch.inference_mode() if inference else torch.no_grad():
                for n, e, start in part:
                    run_expert(e, start, n)

        pool = _pool(workers, os.getpid())
        for job in [pool.submit(run_part, work[i::workers]) for i in range(workers)]:
            job.result()
    else:
        for n, e, start in work:
            run_expert(e, start, n)

    if pair_buffer:  # each token's K rows, gathered back in token order and summed: no scatter
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(S, device=order.device)
        out = pairs.index_select(0, inverse).view(T, K, H).sum(1)
    return out if fp32 else out.to(hidden.dtype)


def _w_at(w: torch.Tensor, x: torch.Tensor, split: int = 1, gemv_rows: int = 0) -> torch.Tensor:
    """w @ x for w [N, D] and x [D, rows]: one GEMM, `split` row blocks of w as one batched GEMM, or
    one GEMV per row when there are at most `gemv_rows` rows."""
    if 1 < x.shape[1] <= gemv_rows:
        return torch.stack([torch.mv(w, x[:, j]) for j in range(x.shape[1])]).t()  # columns contiguous
    if split == 1 or w.shape[0] % split:
        return torch.mm(w, x)
    return torch.bmm(w.view(split, -1, w.shape[1]), x.expand(split, *x.shape)).view(w.shape[0], -1)


@cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per size and process (a forked child has none of its parent's threads)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="adaptc-moe")


def grouped_mm_available() -> bool:
    return hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


def _grouped_mm_moe(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """The same grouping, with torch's grouped GEMM (one call per projection) instead of the loop."""
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    T, H = hidden.shape
    I, K = w2.shape[2], topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    offs = torch.cumsum(torch.bincount(flat_ids, minlength=w2.shape[0]), 0).to(torch.int32)
    token_sorted = order // K
    g = grouped_mm(hidden.index_select(0, token_sorted), w13.transpose(-2, -1), offs=offs)
    h = _act_(g[:, :I], activation)
    if gated:
        h = h * g[:, I:]
    y = grouped_mm(h.contiguous(), w2.transpose(-2, -1), offs=offs).float()
    y.mul_(topk_weights.reshape(-1).index_select(0, order).float()[:, None])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y.index_select(0, inverse).view(T, K, H).sum(1).to(hidden.dtype)
