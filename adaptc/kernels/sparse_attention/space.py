"""What a `sparse_attention` problem is and the configs its CPU implementation takes."""
from __future__ import annotations

from typing import Any

import torch

from .._registry import check_problem
from ..attention.space import bucket, check_heads

KERNEL_NAME = "sparse_attention"

CPU_SPACE: dict[str, list[int]] = {"CHUNK": [1, 2, 4, 8, 16, 32]}  # query blocks per gathered SDPA call
# The query tile is one pattern block; BLOCK_N splits each key block (it must divide the block).
TRITON_SPACE: dict[str, list[int]] = {"BLOCK_N": [16, 32, 64, 128], "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]}


def problem(q, k, v, scale, q_offset, block, sinks, window, topk) -> dict[str, Any]:
    B, Hq, Lq, D = q.shape
    return {"B": B, "Hq": Hq, "Hkv": k.shape[1], "Lq": bucket(Lq), "Lk": bucket(k.shape[2]), "D": D,
            "dtype": str(q.dtype).removeprefix("torch."), "block": block,
            "blocks": max(s + w + t for s, w, t in zip(sinks, window, topk))}


def features(p: dict[str, Any]) -> dict[str, float]:
    keys = min(p["Lk"], p["blocks"] * p["block"])
    elt = torch.empty((), dtype=getattr(torch, p["dtype"])).element_size()
    return {"flops": 4.0 * p["B"] * p["Hq"] * p["Lq"] * keys * p["D"],
            "bytes": elt * p["B"] * p["D"] * (2 * p["Hq"] * p["Lq"] * (1 + keys / p["block"]) + 2 * p["Hkv"] * p["Lk"]),
            "keys_per_query": keys, "density": keys / max(p["Lk"], 1), "Lq": p["Lq"], "Lk": p["Lk"], "D": p["D"],
            "heads": p["Hq"], "gqa": p["Hq"] / p["Hkv"], "block": p["block"]}


def default_config(q, k, v, scale, q_offset, block, sinks, window, topk) -> dict[str, Any]:
    return {"CHUNK": 4}


def triton_default_config(q, k, v, scale, q_offset, block, sinks, window, topk) -> dict[str, Any]:
    return {"BLOCK_N": min(64, block), "num_warps": 4, "num_stages": 2}


def make_inputs(B: int, Hq: int, Hkv: int, Lq: int, Lk: int, D: int, *, block: int = 16, sinks: int = 1,
                window: int = 2, topk: int = 2, dtype=torch.float32, device="cpu", seed: int = 0) -> tuple:
    """Random arguments; heads get different patterns (head h: window + h % 2, topk - h % 2 clipped at 0)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(device, dtype) for H, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    return (q, k, v, D ** -0.5, Lk - Lq, block, [sinks] * Hq, [window + h % 2 for h in range(Hq)],
            [max(0, topk - h % 2) for h in range(Hq)])


def check(p: dict[str, Any]) -> None:
    check_problem(p, {"B": 1, "Hq": 1, "Hkv": 1, "Lq": 1, "Lk": 1, "D": 1, "block": 1, "blocks": 1})
    check_heads(p)


def example_inputs(p: dict[str, Any], device: str = "cpu", seed: int = 0) -> tuple:
    check(p)
    return make_inputs(p["B"], p["Hq"], p["Hkv"], p["Lq"], p["Lk"], p["D"], block=p["block"], sinks=1,
                       window=max(1, p["blocks"] // 2), topk=max(0, p["blocks"] - 1 - p["blocks"] // 2),
                       dtype=getattr(torch, p["dtype"]), device=device, seed=seed)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-3, "rtol": 2e-3},
            torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}[dtype]
