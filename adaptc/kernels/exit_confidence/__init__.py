"""Exit confidence: `adaptc::exit_confidence`, the top-1 probability, top-1/top-2 margin and argmax of
an LM head's softmax by an online reduction over vocabulary tiles, with reference, CPU and Triton versions."""
from __future__ import annotations

import torch

from .._registry import ConfigSpace, Implementation, Kernel, register
from . import space
from .cpu import cpu_exit_confidence
from .reference import torch_exit_confidence


def _triton(hidden, weight, bias=None, config=None):
    from .triton import triton_exit_confidence  # imported on first use: Triton may be absent
    return triton_exit_confidence(hidden, weight, bias, config=config)


def _triton_supports(hidden, weight, bias=None) -> str | None:
    try:
        from .triton import supports
    except ImportError as e:
        return f"the Triton exit-confidence kernel is not importable: {e}"
    return supports(hidden, weight, bias)


def _triton_default(hidden, weight, bias=None):
    from .triton import default_config
    return default_config(hidden, weight, bias)


def _smem_bytes(device) -> int:
    """Shared memory one block may use on `device` (H100's for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return space.H100_SMEM_BYTES
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", space.H100_SMEM_BYTES)


def _triton_fits(cfg, hidden, weight, bias=None) -> bool:
    return space.triton_config_fits(cfg, weight.dtype, _smem_bytes(weight.device))


def _cpu_supports(hidden, weight, bias=None) -> str | None:
    devices = {t.device.type for t in (hidden, weight, bias) if t is not None}
    return None if devices == {"cpu"} else f"tensors are on {sorted(devices)}, not cpu"


KERNEL = register(Kernel(
    space.KERNEL_NAME, torch_exit_confidence,
    {"cpu": Implementation(cpu_exit_confidence, _cpu_supports, ConfigSpace(space.CPU_SPACE, space.cpu_default_config)),
     "triton": Implementation(_triton, _triton_supports,
                              ConfigSpace(space.TRITON_SPACE, _triton_default, _triton_fits))},
    problem=space.problem, features=space.features, tolerance=space.tolerance, example=space.example_inputs,
    check=space.check, agrees=space.agrees, config_features=space.config_features,
))

from .op import exit_confidence  # noqa: E402  (registers the custom op)

__all__ = ["exit_confidence", "torch_exit_confidence", "cpu_exit_confidence", "KERNEL"]
