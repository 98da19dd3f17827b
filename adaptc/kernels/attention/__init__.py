"""Attention that skips what its mask hides: `adaptc::attention` with a reference, CPU and Triton versions."""
from __future__ import annotations

from .._registry import ConfigSpace, Implementation, Kernel, register
from . import space
from .cpu import cpu_attention
from .reference import torch_attention


def _triton(q, k, v, key_padding, mask, scale, causal, window, q_offset, config=None):
    from .triton import triton_attention  # imported on first use: Triton may be absent
    return triton_attention(q, k, v, scale, causal, window, q_offset, key_padding, config=config)


def _triton_supports(q, k, v, key_padding, mask, scale, causal, window, q_offset) -> str | None:
    if mask is not None:
        return "an explicit mask without known structure runs on the reference (SDPA)"
    try:
        from .triton import supports
    except ImportError as e:
        return f"the Triton attention kernel is not importable: {e}"
    return supports(q, k, v, scale, causal, window, q_offset, key_padding)


def _triton_default(q, k, v, key_padding, mask, scale, causal, window, q_offset):
    from .triton import default_config
    return default_config(q, k, v, scale, causal, window, q_offset, key_padding)


def _triton_fits(cfg, q, *args) -> bool:
    from .triton import config_fits
    return config_fits(cfg, q.shape[-1], q.dtype, Lq=q.shape[2])


def _cpu_supports(q, *args) -> str | None:
    return None if q.device.type == "cpu" else f"tensors are on {q.device.type}, not cpu"


KERNEL = register(Kernel(
    space.KERNEL_NAME, torch_attention,
    {"cpu": Implementation(cpu_attention, _cpu_supports, ConfigSpace(space.CPU_SPACE, space.cpu_default_config)),
     "triton": Implementation(_triton, _triton_supports,
                              ConfigSpace(space.TRITON_SPACE, _triton_default, _triton_fits))},
    problem=space.problem, features=space.features, tolerance=space.tolerance, example=space.example_inputs,
    check=space.check, config_features=space.config_features,
))

from . import op  # noqa: E402,F401  (registers the custom op)
