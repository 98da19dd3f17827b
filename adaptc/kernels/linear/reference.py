"""`torch_linear`: the oracle, F.linear (what nn.Linear calls: MKL's or cuBLAS's GEMM)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[int, int, int]:
    """(M rows, K inputs, N outputs); ValueError for arguments F.linear would reject."""
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear takes x [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    return x.numel() // max(x.shape[-1], 1), weight.shape[1], weight.shape[0]


def torch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)
