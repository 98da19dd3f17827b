"""What an `attention` problem is and the configs its implementations take (read by the tuner)."""
from __future__ import annotations

import math
from typing import Any

import torch

from .._registry import check_problem, grid_features

KERNEL_NAME = "attention"


def bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length() if n > 1 else n


def problem(q, k, v, key_padding, mask, scale, causal, window, q_offset) -> dict[str, Any]:
    """The tuning bucket: shapes (lengths rounded up to powers of two), dtype and mask structure."""
    B, Hq, Lq, D = q.shape
    return {"B": B, "Hq": Hq, "Hkv": k.shape[1], "Lq": bucket(Lq), "Lk": bucket(k.shape[2]), "D": D,
            "dtype": str(q.dtype).removeprefix("torch."), "causal": bool(causal), "window": int(window),
            "padded": key_padding is not None, "masked": mask is not None}


def features(p: dict[str, Any]) -> dict[str, float]:
    """FLOPs and bytes of the visible part of attention (uniformly dense within the band)."""
    Lq, Lk = p["Lq"], p["Lk"]
    keys = min(Lk, p["window"]) if p["window"] else (Lk / 2 if p["causal"] and Lq == Lk else Lk)
    elt = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    flops = 4.0 * p["B"] * p["Hq"] * Lq * keys * p["D"]
    bytes_ = elt * p["B"] * p["D"] * (2 * p["Hq"] * Lq + 2 * p["Hkv"] * Lk)
    return {"flops": flops, "bytes": bytes_, "keys_per_query": keys, "density": keys / max(Lk, 1),
            "Lq": Lq, "Lk": Lk, "D": p["D"], "heads": p["Hq"], "gqa": p["Hq"] / p["Hkv"]}


def config_features(impl: str, p: dict[str, Any], cfg: dict[str, Any], units: int) -> dict[str, float]:
    """Query tiles over (batch, head) and waves (Triton; split-KV multiplies decode's tiles), or the
    number of per-block SDPA calls and keys each reads (CPU)."""
    keys = features(p)["keys_per_query"]
    m_blocks = math.ceil(p["Lq"] / cfg["BLOCK_M"])
    if impl == "triton":
        splits = cfg["SPLITS"] if p["Lq"] <= cfg["BLOCK_M"] else 1
        grid = grid_features(p["B"] * p["Hq"] * m_blocks * splits, units)
        return {**grid, "key_steps": keys / splits / cfg["BLOCK_N"], "q_padding": m_blocks * cfg["BLOCK_M"] / p["Lq"]}
    # a block of causal queries reads keys up to its last row: the wasted band grows with the block
    band = min(p["Lk"], keys + (cfg["BLOCK_M"] / 2 if p["causal"] else 0))
    return {"calls": float(m_blocks), "keys_per_call": band, "heads_per_core": p["B"] * p["Hq"] / max(units, 1)}


CPU_SPACE: dict[str, list[Any]] = {"BLOCK_M": [32, 64, 128, 256, 512, 1024]}

TRITON_SPACE: dict[str, list[int]] = {
    "BLOCK_M": [16, 32, 64, 128],
    "BLOCK_N": [16, 32, 64, 128],
    "num_warps": [2, 4, 8],
    "num_stages": [1, 2, 3, 4],
    "SPLITS": [1, 2, 4, 8, 16, 32],  # split-KV path only (decode: few queries)
}


def cpu_default_config(q, k, v, key_padding, mask, scale, causal, window, q_offset) -> dict[str, Any]:
    # Blocks near the window size waste little of each key range; large blocks amortise the calls.
    return {"BLOCK_M": 128 if window and window <= 256 else 256}


def make_inputs(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, *, dtype=torch.float32, device="cpu",
                causal: bool = True, window: int = 0, padding: str | None = None, seed: int = 0) -> tuple:
    """Random attention arguments; padding "left" or "right" pads the first batch row by a third."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(device, dtype)
    key_padding = None
    if padding:
        key_padding = torch.ones(B, Lk, dtype=torch.bool, device=device)
        n = max(1, Lk // 3)
        if padding == "left":
            key_padding[0, :n] = False
        else:
            key_padding[0, Lk - n:] = False
    return q, k, v, key_padding, None, D ** -0.5, causal, window, Lk - Lq


def example_inputs(p: dict[str, Any], device: str = "cpu", seed: int = 0) -> tuple:
    """Random arguments for a problem; the mask-structure flags default to false."""
    check(p)
    return make_inputs(p["B"], p["Hq"], p["Hkv"], p["Lq"], p["Lk"], p["D"], dtype=getattr(torch, p["dtype"]),
                       device=device, causal=p.get("causal", False), window=p["window"],
                       padding="left" if p.get("padded") else None, seed=seed)


def check(p: dict[str, Any]) -> None:
    check_problem(p, {"B": 1, "Hq": 1, "Hkv": 1, "Lq": 1, "Lk": 1, "D": 1, "window": 0},
                  flags=("causal", "padded", "masked"))
    check_heads(p)
    if p.get("masked"):
        raise ValueError("masked=true cannot be made up from sizes: an attention mask comes from a model "
                         "(tune it with --hf-config)")


def check_heads(p: dict[str, Any]) -> None:
    if p["Hq"] % p["Hkv"]:
        raise ValueError(f"Hq must be a multiple of Hkv (grouped-query heads), got Hq={p['Hq']}, Hkv={p['Hkv']}")


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
            torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}[dtype]
