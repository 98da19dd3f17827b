"""Fused Mixture-of-Experts: `adaptc::fused_moe` with a reference, a CPU and a Triton implementation."""
from __future__ import annotations

from .._registry import Implementation, Kernel, register
from .cpu import cpu_fused_moe
from .reference import torch_fused_moe
from .space import KERNEL_NAME


def _triton(*args):
    from .triton import triton_fused_moe  # imported on first use: Triton may be absent (macOS, Windows)
    return triton_fused_moe(*args)


def _triton_supports(*args) -> str | None:
    try:
        from .triton import supports
    except ImportError as e:
        return f"triton is not importable: {e}"
    return supports(*args)


def _cpu_supports(hidden, *args) -> str | None:
    return None if hidden.device.type == "cpu" else f"tensors are on {hidden.device.type}, not cpu"


KERNEL = register(Kernel(KERNEL_NAME, torch_fused_moe, {
    "cpu": Implementation(cpu_fused_moe, _cpu_supports),
    "triton": Implementation(_triton, _triton_supports),
}))

from . import op  # noqa: E402,F401  (registers the custom op)
