"""Fused Mixture-of-Experts: `adaptc::fused_moe` with a reference, a CPU and a Triton implementation."""
from __future__ import annotations

import torch

from .._registry import ConfigSpace, Implementation, Kernel, register
from . import space
from .cpu import cpu_fused_moe, grouped_mm_available
from .reference import torch_fused_moe


def _dims(*args):
    return (*space.moe_dims(*args), args[0].dtype, args[6])


def _triton(*args, config=None):
    from .triton import triton_fused_moe  # imported on first use: Triton may be absent (macOS, Windows)
    return triton_fused_moe(*args, config=config)


def _triton_supports(*args) -> str | None:
    try:
        from .triton import supports
    except ImportError as e:
        return f"triton is not importable: {e}"
    return supports(*args)


def _cpu_supports(hidden, *args) -> str | None:
    return None if hidden.device.type == "cpu" else f"tensors are on {hidden.device.type}, not cpu"


CPU_SPACE = ConfigSpace(space.CPU_SPACE, lambda *a: space.cpu_default_config(*_dims(*a)),
                        lambda cfg, *a: space.cpu_config_fits(cfg, grouped_mm_available(), experts=a[4].shape[0],
                                                              tokens=a[0].shape[0]))


def _smem_bytes(device) -> int:
    """Shared memory one block may use on `device` (H100's for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return space.H100_SMEM_BYTES
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", space.H100_SMEM_BYTES)


TRITON_SPACE = ConfigSpace(space.TRITON_SPACE, lambda *a: space.triton_default_config(*_dims(*a)),
                           lambda cfg, *a: space.triton_config_fits(cfg, a[0].dtype, a[6], _smem_bytes(a[0].device)))

KERNEL = register(Kernel(
    space.KERNEL_NAME, torch_fused_moe,
    {"cpu": Implementation(cpu_fused_moe, _cpu_supports, CPU_SPACE),
     "triton": Implementation(_triton, _triton_supports, TRITON_SPACE)},
    problem=space.problem, features=space.problem_features, tolerance=space.tolerance,
    example=space.example_inputs, check=space.check, config_features=space.config_features,
))

from . import op  # noqa: E402,F401  (registers the custom op)
