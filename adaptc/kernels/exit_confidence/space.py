"""What an `exit_confidence` problem is, the configs its implementations take, and what it costs.

Read by the tuner without importing Triton.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .._registry import check_problem, grid_features

KERNEL_NAME = "exit_confidence"
H100_SMEM_BYTES = 232448  # max dynamic shared memory per block on sm_90


def bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length() if n > 1 else n


def problem(hidden, weight, bias=None) -> dict[str, Any]:
    """The tuning bucket: rows rounded up to a power of two, the head's exact shape, dtype, bias."""
    return {"N": bucket(hidden.shape[0]), "V": weight.shape[0], "D": weight.shape[1],
            "dtype": str(weight.dtype).removeprefix("torch."), "bias": bias is not None}


def features(p: dict[str, Any]) -> dict[str, float]:
    """The head's GEMM FLOPs and the bytes it must read (the weight dominates at decode sizes)."""
    elt = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    flops = 2.0 * p["N"] * p["V"] * p["D"]
    bytes_ = elt * (p["V"] * p["D"] + p["N"] * p["D"] + (p["V"] if p["bias"] else 0)) + 12.0 * p["N"]
    # What the plain path also writes and re-reads: the fp32 logits and probabilities.
    logits_bytes = 4.0 * p["N"] * p["V"]
    return {"flops": flops, "bytes": bytes_, "intensity": flops / bytes_, "logits_bytes": logits_bytes,
            "N": p["N"], "V": p["V"], "D": p["D"]}


def config_features(impl: str, p: dict[str, Any], cfg: dict[str, Any], units: int) -> dict[str, float]:
    """Programs over (row blocks, vocabulary slices) and their waves (Triton), or chunk count (CPU)."""
    if impl == "triton":
        grid = grid_features(math.ceil(p["N"] / cfg["BLOCK_M"]) * cfg["SPLITS"], units)
        return {**grid, "v_steps": p["V"] / cfg["SPLITS"] / cfg["BLOCK_V"], "m_padding": math.ceil(p["N"] / cfg["BLOCK_M"]) * cfg["BLOCK_M"] / p["N"]}
    return {"chunks": math.ceil(p["V"] / cfg["CHUNK"]), "chunk_logit_bytes": 4.0 * p["N"] * min(cfg["CHUNK"], p["V"])}


# CHUNK: vocabulary rows per matmul; a chunk of logits [N, CHUNK] should stay in the cache.
CPU_SPACE: dict[str, tuple[Any, ...]] = {"CHUNK": (512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)}

TRITON_SPACE: dict[str, tuple[int, ...]] = {
    "BLOCK_M": (16, 32, 64, 128),
    "BLOCK_V": (32, 64, 128, 256),
    "BLOCK_D": (32, 64, 128),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
    "SPLITS": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),  # vocabulary slices: a decode row still fills the GPU
}


def cpu_default_config(hidden, weight, bias=None) -> dict[str, Any]:
    # Measured on a 2-core EPYC at V=49152, D=576. Logits of at most 1 MiB stay in cache anyway: one
    # chunk (a single GEMV for a decode row; splitting it only added calls). Past that, 2048-row chunks
    # (N x 2048 fp32 logits stay in L2) beat both larger chunks and the unchunked matmul.
    n, V = max(hidden.shape[0], 1), weight.shape[0]
    if n * V * 4 <= 1 << 20:
        return {"CHUNK": min((c for c in CPU_SPACE["CHUNK"] if c >= V), default=CPU_SPACE["CHUNK"][-1])}
    return {"CHUNK": min(16384, max(2048, 16384 // n))}


def triton_config_fits(cfg: dict[str, Any], dtype: torch.dtype, smem: int = H100_SMEM_BYTES) -> bool:
    """False for configs that cannot launch (shared memory) or would spill (registers)."""
    elt = torch.empty((), dtype=dtype).element_size()
    if cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_V"]) * cfg["BLOCK_D"] * elt > smem:
        return False
    # The fp32 logit tile plus its reductions over num_warps*32 threads: past ~128 floats a thread it spills.
    return cfg["BLOCK_M"] * cfg["BLOCK_V"] // (cfg["num_warps"] * 32) <= 128


def make_inputs(N: int, V: int, D: int, *, dtype=torch.float32, device="cpu", bias: bool = True,
                seed: int = 0, spread: float = 1.0) -> tuple:
    """A random LM head and hidden rows. `spread` scales the logits: larger = more confident rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, D, generator=g) * spread).to(device, dtype)
    weight = (torch.randn(V, D, generator=g) * D ** -0.5).to(device, dtype)
    b = (0.5 * torch.randn(V, generator=g)).to(device, dtype) if bias else None
    return hidden, weight, b


def check(p: dict[str, Any]) -> None:
    check_problem(p, {"N" if "N" in p else "T": 1, "V": 2, "D": 1}, flags=("bias",))


def example_inputs(p: dict[str, Any], device: str = "cpu", seed: int = 0) -> tuple:
    """Arguments for a problem; `adaptc tune exit_confidence --problem V=49152,D=576 --tokens 1` passes the
    rows as T and no bias flag."""
    check(p)
    return make_inputs(p["N"] if "N" in p else p["T"], p["V"], p["D"], dtype=getattr(torch, p.get("dtype", "float32")),
                       device=device, bias=bool(p.get("bias", False)), seed=seed)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """For max_prob and margin (fp32 probabilities). Every implementation accumulates in fp32 from
    exactly upcast inputs, so the dtype changes only how far summation order moves the logits."""
    return {torch.float32: {"atol": 2e-5, "rtol": 1e-4}, torch.float16: {"atol": 2e-5, "rtol": 1e-4},
            torch.bfloat16: {"atol": 2e-5, "rtol": 1e-4}}[dtype]


def agrees(got: tuple, want: tuple, tol: dict[str, float]) -> bool:
    """max_prob and margin within `tol`; top-1 equal wherever the reference's top two logits are not a
    near-tie (its margin above the tolerance): there summation order may legitimately swap them."""
    (p, m, i), (wp, wm, wi) = got, want
    if not (torch.allclose(p.float(), wp.float(), **tol) and torch.allclose(m.float(), wm.float(), **tol)):
        return False
    clear = wm > 4 * (tol["atol"] + tol["rtol"] * wp)
    return bool((i[clear] == wi[clear]).all())
