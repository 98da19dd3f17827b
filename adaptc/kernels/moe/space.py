"""What a `fused_moe` problem is, the configs its implementations accept, and what it costs.

Three things live here and nowhere else, so the tuner can read them without importing Triton:

* `problem` — the bucket a tuned config is valid for (T rounded up to a power of two).
* the config spaces — candidate values per knob (`TRITON_SPACE`, `CPU_SPACE`), a constraint that
  prunes Triton configs that cannot fit in shared memory (`triton_config_fits`), and heuristic
  defaults (`triton_default_config`, `cpu_default_config`) for when nothing is tuned.
* analytic features (`features`): FLOPs and bytes moved, for the cost model and roofline checks.

`sample_inputs` is the conformance hook: small random problems every implementation must agree on.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Iterator

import torch

from .._registry import check_problem, grid_features

KERNEL_NAME = "fused_moe"
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Problem shape
# ----------------------------------------------------------------------------------------------

def moe_dims(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
             w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool) -> tuple[int, int, int, int, int]:
    """(T, H, I, E, K) of a fused_moe call; raises ValueError when the arguments do not fit together."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in DTYPES:
        raise ValueError(f"hidden dtype {hidden.dtype} not in {DTYPES}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not in {ACTIVATIONS}")
    T, H = hidden.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [T={T}, K]")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids must be int64 or int32, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must be floating point, got {topk_weights.dtype}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 and w2 must be 3-D, got {tuple(w13.shape)} and {tuple(w2.shape)}")
    E, H2, I = w2.shape
    if H2 != H:
        raise ValueError(f"w2 is [E, H, I]; its H={H2} differs from hidden's H={H}")
    want = (E, 2 * I if gated else I, H)
    if tuple(w13.shape) != want:
        raise ValueError(f"w13 must be {list(want)} (gated={gated}), got {list(w13.shape)}")
    if w13.dtype != hidden.dtype or w2.dtype != hidden.dtype:
        raise ValueError(f"weights ({w13.dtype}, {w2.dtype}) must have hidden's dtype {hidden.dtype}")
    return T, H, I, E, topk_ids.shape[1]


def bucket_tokens(T: int) -> int:
    """T rounded up to a power of two (0 and 1 stay): the tuned-config bucket."""
    return 1 << max(T - 1, 0).bit_length() if T > 1 else T




def problem(*args) -> dict[str, Any]:
    """The tuning bucket of a fused_moe call (op arguments): JSON scalars, tokens rounded up."""
    T, H, I, E, K = moe_dims(*args)
    return {"T": bucket_tokens(T), "H": H, "I": I, "E": E, "K": K,
            "dtype": str(args[0].dtype).removeprefix("torch."), "gated": bool(args[6])}


def problem_features(p: dict[str, Any]) -> dict[str, float]:
    """`features` of a `problem` dict."""
    return features(p["T"], p["H"], p["I"], p["E"], p["K"], getattr(torch, p["dtype"]), p["gated"])


def config_features(impl: str, p: dict[str, Any], cfg: dict[str, Any], units: int) -> dict[str, float]:
    """Tiles and waves of the two grouped GEMMs (Triton), or row padding and GEMM calls (CPU)."""
    pairs = p["T"] * p["K"]
    active = min(p["E"], pairs)
    rows = pairs / active  # rows per hit expert, assuming balanced routing
    if impl == "triton":
        m_tiles = active * math.ceil(rows / cfg["BLOCK_M"])
        up = grid_features(m_tiles * math.ceil(p["I"] / cfg["BLOCK_N"]), units)
        return {**{f"up_{k}": v for k, v in up.items()}, "m_padding": m_tiles * cfg["BLOCK_M"] / pairs,
                "down_waves": grid_features(m_tiles * math.ceil(p["H"] / cfg["BLOCK_N"]), units)["waves"],
                "k_steps": p["H"] / cfg["BLOCK_K"]}
    pad = int(cfg.get("row_pad", 1))
    loop = cfg.get("algorithm") == "loop"
    gemv = loop and 1 < rows <= cfg.get("gemv_rows", 0)
    return {"gemm_calls": (2.0 * active * (rows if gemv else 1)) if loop else 2.0,
            "row_padding": math.ceil(rows / pad) * pad / rows, "rows_per_gemm": rows,
            "cores_per_gemm_row": units / rows,
            "experts_per_worker": active / min(cfg.get("workers", 1), active)}


# ----------------------------------------------------------------------------------------------
# Triton config space
# ----------------------------------------------------------------------------------------------

TRITON_SPACE: dict[str, list[int]] = {
    "BLOCK_M": [16, 32, 64, 128],
    "BLOCK_N": [32, 64, 128, 256],
    "BLOCK_K": [32, 64, 128, 256],
    "GROUP_M": [1, 4, 8, 16],
    "num_warps": [4, 8],
    "num_stages": [2, 3, 4, 5],
}
H100_SMEM_BYTES = 232448  # max dynamic shared memory per block on sm_90 (227 KiB)


def triton_smem_bytes(cfg: dict[str, Any], dtype: torch.dtype, gated: bool = True) -> int:
    """Shared memory the pipelined main loop of the up-projection kernel needs (the larger of the two).

    Per stage: one A tile (BLOCK_M x BLOCK_K) and one B tile per accumulator (gate and up when gated).
    """
    elt = torch.empty((), dtype=dtype).element_size()
    b_tiles = 2 if gated else 1
    return cfg["num_stages"] * (cfg["BLOCK_M"] + b_tiles * cfg["BLOCK_N"]) * cfg["BLOCK_K"] * elt


def triton_config_fits(cfg: dict[str, Any], dtype: torch.dtype, gated: bool = True,
                       smem_bytes: int = H100_SMEM_BYTES) -> bool:
    """False for configs that cannot launch (shared memory) or waste the machine (register pressure)."""
    if triton_smem_bytes(cfg, dtype, gated) > smem_bytes:
        return False
    # Two fp32 accumulators of BLOCK_M x BLOCK_N spread over num_warps*32 threads: past ~256 floats
    # per thread they spill.
    accs = 2 if gated else 1
    return accs * cfg["BLOCK_M"] * cfg["BLOCK_N"] // (cfg["num_warps"] * 32) <= 256




def triton_default_config(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, gated: bool) -> dict[str, Any]:
    """Heuristic tiles when nothing is tuned: BLOCK_M follows the average rows per expert."""
    rows_per_expert = T * K / max(E, 1)
    wide = dtype == torch.float32  # fp32 tiles cost twice the shared memory
    if rows_per_expert <= 16:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64 if wide else 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
    elif rows_per_expert <= 64:
        cfg = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    elif rows_per_expert <= 256:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64 if wide else 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 64 if wide else 128, "BLOCK_K": 32 if wide else 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    # Narrow problems (tests, tiny experts): no tile wider than the dimension it covers.
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, _next_pow2(min(I, H))))
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, _next_pow2(min(I, H))))
    return cfg


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------------
# CPU config space
# ----------------------------------------------------------------------------------------------

CPU_SPACE: dict[str, list[Any]] = {
    # "loop": a GEMM pair per hit expert (the knobs below apply). "grouped_mm": torch's grouped GEMM,
    # one call per projection (faster with many small experts on some CPUs; needs torch >= 2.9).
    "algorithm": ["loop", "grouped_mm"],
    # "wx": W @ x^T per expert (activations kept [features, rows]); MKL streams the weight matrix
    # with few rows far better this way. "xw": x @ W^T, the nn.functional.linear layout.
    "layout": ["wx", "xw"],
    # "index_add": each expert adds its rows into the fp32 output right away.
    # "pair_sum": experts write a [T*K, H] pair buffer, gathered back in token order and summed over K (no
    # scatter: index_add_ stalls badly on a busy CPU, 37 ms for 2 rows measured under load).
    "combine": ["index_add", "pair_sum"],
    # Round each expert's row count up to a multiple of this (extra rows are computed and dropped):
    # MKL's small-n GEMM paths are uneven (8 rows measured 1.4x slower than 16 on 2 cores).
    "row_pad": [1, 8, 16],
    # Layout "wx" only: cut each gate/up weight into this many row blocks, run as one batched GEMM
    # (see cpu.py: a GEMV otherwise uses one core). For a lone expert, where workers cannot help.
    "split": [1, 2, 8],
    # Layout "wx" only: an expert with 2..gemv_rows rows runs one GEMV per row (MKL's GEMM on 2-3
    # columns streams the weight at half a GEMV's speed; the second row reads it from cache).
    "gemv_rows": [0, 4],
    # Threads that run experts concurrently (pair_sum only: their writes must not overlap); at most
    # the intra-op thread count.
    "workers": [1, 2, 4, 8],
}


def cpu_default_config(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, gated: bool) -> dict[str, Any]:
    # Measured on 2 cores: pair_sum 1.0-1.4x index_add; with up to ~32 rows per expert, a thread per
    # core over experts 1.2-1.4x one thread; with one expert and at most 2 rows, split 8 1.6x a GEMV.
    rows = T * K / min(E, T * K) if T else 0
    workers = max_workers() if E > 1 and rows <= 32 else 1
    split = 8 if rows <= 2 and workers == 1 else 1
    return {"algorithm": "loop", "layout": "wx", "combine": "pair_sum", "row_pad": 1, "split": split,
            "gemv_rows": 4 if gemv_can_apply(T, E, 4) else 0, "workers": workers}


def gemv_can_apply(tokens: int, experts: int, gemv_rows: int) -> bool:
    """Whether some expert can get 2..gemv_rows rows: not from one token (a token picks an expert at
    most once), nor for a lone expert with more tokens (it gets them all; the tuning bucket of T
    rounds up to a power of two, so this holds for every T of the bucket too)."""
    return tokens > 1 and (experts > 1 or tokens <= gemv_rows)


def max_workers() -> int:
    """The largest `workers` value this process can use (its intra-op thread count)."""
    return max(w for w in CPU_SPACE["workers"] if w <= max(torch.get_num_threads(), 1))


def cpu_config_fits(cfg: dict[str, Any], grouped_mm_available: bool = True, experts: int = 2, tokens: int = 2) -> bool:
    """grouped_mm ignores the loop's knobs: keep one config of it, and only where torch has it. Nor
    do knobs that change nothing for the problem: workers with one expert, GEMVs on padded rows or
    where no expert gets 2-4 rows. A measurement spent on a duplicate config only measures noise."""
    knobs = (cfg["layout"], cfg["combine"], cfg["row_pad"], cfg["split"], cfg["gemv_rows"], cfg["workers"])
    if cfg["algorithm"] == "grouped_mm":
        return grouped_mm_available and knobs == ("wx", "pair_sum", 1, 1, 0, 1)
    if cfg["workers"] > 1 and (experts == 1 or cfg["workers"] > max_workers() or cfg["combine"] != "pair_sum"
                               or cfg["split"] > 1):
        return False  # workers write pair rows; split's batched GEMM already takes every core
    if cfg["gemv_rows"] and (cfg["row_pad"] > 1 or not gemv_can_apply(tokens, experts, cfg["gemv_rows"])):
        return False  # padded experts have 8+ rows; GEMVs need an expert with 2..gemv_rows rows
    return cfg["layout"] == "wx" or (cfg["split"] == 1 and cfg["gemv_rows"] == 0)


def cpu_configs() -> Iterator[dict[str, Any]]:
    keys = list(CPU_SPACE)
    for values in itertools.product(*(CPU_SPACE[k] for k in keys)):
        if cpu_config_fits(cfg := dict(zip(keys, values))):
            yield cfg




# ----------------------------------------------------------------------------------------------
# Analytic features
# ----------------------------------------------------------------------------------------------

def features(T: int, H: int, I: int, E: int, K: int, dtype: torch.dtype, gated: bool) -> dict[str, float]:
    """FLOPs and bytes of one call, assuming uniform routing (experts hit = min(E, T*K))."""
    elt = torch.empty((), dtype=dtype).element_size()
    pairs = T * K
    up_rows = (2 if gated else 1) * I
    flops = 2.0 * pairs * H * (up_rows + I)
    experts_hit = min(E, pairs)
    weight_bytes = experts_hit * (up_rows * H + H * I) * elt
    act_bytes = (T * H * 2 + pairs * (H + I) * 2) * elt + pairs * (8 + 4)
    total_bytes = weight_bytes + act_bytes
    return {
        "T": T, "H": H, "I": I, "E": E, "K": K, "gated": float(gated), "elt_bytes": elt,
        "pairs": pairs, "rows_per_expert": pairs / max(E, 1), "experts_hit": experts_hit,
        "flops": flops, "weight_bytes": weight_bytes, "bytes": total_bytes,
        "intensity": flops / max(total_bytes, 1),
    }


# ----------------------------------------------------------------------------------------------
# Conformance hook
# ----------------------------------------------------------------------------------------------

def make_inputs(T: int, H: int, I: int, E: int, K: int, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", gated: bool = True, activation: str = "silu",
                seed: int = 0, ids_dtype: torch.dtype = torch.int64, skip_experts: int = 0) -> tuple:
    """Random, non-degenerate fused_moe arguments.

    Routing picks K distinct experts per token from the first E - skip_experts (so the last
    `skip_experts` get no tokens); weights are softmax-like positive floats. Scales keep every
    intermediate O(1) so dtype-relative tolerances mean something.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, (2 if gated else 1) * I, H, generator=g) / math.sqrt(H)
    w2 = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    live = max(E - skip_experts, K)
    ids = torch.rand(T, live, generator=g).argsort(dim=1)[:, :K]
    weights = torch.rand(T, K, generator=g).softmax(dim=-1)
    return (hidden.to(device, dtype), weights.to(device), ids.to(device, ids_dtype),
            w13.to(device, dtype), w2.to(device, dtype), activation, gated)


def check(p: dict[str, Any]) -> None:
    check_problem(p, {"T": 1, "H": 1, "I": 1, "E": 1, "K": 1}, flags=("gated",))
    if p["K"] > p["E"]:
        raise ValueError(f"K (experts per token) must be at most E (experts), got K={p['K']}, E={p['E']}")


def example_inputs(p: dict[str, Any], device: str = "cpu", seed: int = 0) -> tuple:
    """Random arguments for a `problem` dict."""
    check(p)
    return make_inputs(p["T"], p["H"], p["I"], p["E"], p["K"], dtype=getattr(torch, p["dtype"]), device=device,
                       gated=p.get("gated", True), seed=seed)


def sample_inputs(device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> Iterator[tuple]:
    """Small problems every implementation must match the reference on (argument tuples)."""
    shapes = [  # T, H, I, E, K, gated, activation, skip_experts, ids dtype
        (1, 32, 32, 4, 2, True, "silu", 0, torch.int64),
        (7, 64, 32, 8, 2, True, "gelu", 3, torch.int32),
        (33, 32, 64, 8, 1, False, "relu", 2, torch.int64),
        (17, 48, 40, 6, 2, True, "gelu_tanh", 1, torch.int64),
        (0, 32, 32, 4, 2, True, "silu", 0, torch.int64),
    ]
    for i, (T, H, I, E, K, gated, act, skip, ids_dtype) in enumerate(shapes):
        yield make_inputs(T, H, I, E, K, dtype=dtype, device=device, gated=gated, activation=act,
                          seed=seed * 1000 + i, ids_dtype=ids_dtype, skip_experts=skip)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """atol/rtol for comparing an implementation's output with the reference's in `dtype`."""
    return {torch.float32: {"atol": 1e-4, "rtol": 1e-4},
            torch.float16: {"atol": 5e-3, "rtol": 5e-3},
            torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2}}[dtype]
