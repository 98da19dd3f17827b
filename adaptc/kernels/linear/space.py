"""What a `linear` problem is, the one knob its CPU implementation takes, and the untuned heuristic.

Read by the tuner without importing anything heavy.
"""
from __future__ import annotations

from typing import Any

import torch

from .._registry import check_problem

KERNEL_NAME = "linear"
CPU_SPACE: dict[str, tuple[Any, ...]] = {"backend": ("aten", "onednn")}
PACKED_DTYPES = (torch.float32, torch.bfloat16)  # oneDNN's fp16 GEMM needs AVX512-FP16 / AMX to pay


def bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length() if n > 1 else n


def problem(x, weight, bias=None) -> dict[str, Any]:
    """Rows rounded up to a power of two (decode rows stay 1), the layer's exact shape, dtype, bias and
    the thread count: which GEMM wins changes with all of them."""
    m = x.numel() // max(x.shape[-1], 1)
    return {"M": bucket(m), "K": weight.shape[1], "N": weight.shape[0], "dtype": str(weight.dtype).removeprefix("torch."),
            "bias": bias is not None, "threads": torch.get_num_threads()}


def features(p: dict[str, Any]) -> dict[str, float]:
    elt = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    flops = 2.0 * p["M"] * p["K"] * p["N"]
    bytes_ = elt * (p["K"] * p["N"] + p["M"] * (p["K"] + p["N"]))
    return {"flops": flops, "bytes": bytes_, "intensity": flops / bytes_, "M": p["M"], "K": p["K"], "N": p["N"]}


def config_features(impl: str, p: dict[str, Any], cfg: dict[str, Any], units: int) -> dict[str, float]:
    return {"onednn": float(cfg["backend"] == "onednn")}


def cpu_default_config(x, weight, bias=None) -> dict[str, Any]:
    # Measured on a 2-core EPYC (Zen 4), 1 thread (benchmarks/results/linear-*.md): oneDNN's GEMM on a
    # prepacked weight beats MKL's at every size in bf16 (1.03-2.3x) and in fp32 from 8 rows up
    # (1.2-3.5x); for one or two fp32 rows MKL's GEMV wins or ties on a layer's weights (0.36-1.0x at one
    # row, 0.59-0.73x at two on some) and loses on an LM head (2.5x / 4.5x at 576x49152). Untuned, the
    # default never picks the side that lost; tuning measures both.
    m = x.numel() // max(x.shape[-1], 1)
    gemv = weight.dtype == torch.float32 and m <= 2 and weight.numel() < 4_000_000
    return {"backend": "aten" if gemv else "onednn"}


def check(p: dict[str, Any]) -> None:
    check_problem(p, {"M": 1, "K": 1, "N": 1, "threads": 1} if "threads" in p else {"M": 1, "K": 1, "N": 1},
                  flags=("bias",))


def example_inputs(p: dict[str, Any], device: str = "cpu", seed: int = 0) -> tuple:
    """Random x [M, K], weight [N, K] scaled like a trained layer (outputs of order 1), bias."""
    check(p)
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, p.get("dtype", "float32"))
    x = torch.randn(p["M"], p["K"], generator=g).to(device, dtype)
    w = (torch.randn(p["N"], p["K"], generator=g) * p["K"] ** -0.5).to(device, dtype)
    b = (0.1 * torch.randn(p["N"], generator=g)).to(device, dtype) if p.get("bias", False) else None
    return x, w, b


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Both GEMMs accumulate in fp32; only the summation order differs (bf16: the output's rounding)."""
    return {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
            torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}[dtype]
