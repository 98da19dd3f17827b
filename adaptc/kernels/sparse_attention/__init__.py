"""Approximate block-sparse attention (sinks + local window + top-k blocks per head): `adaptc::sparse_attention`.

The patterns are chosen per head by calibration (adaptc.calibrate.attention_sparsity); a reference, a CPU
implementation (gathered blocks + SDPA) and a Triton one (flash attention over each query block's list).
"""
from __future__ import annotations

from .._registry import ConfigSpace, Implementation, Kernel, register
from . import space
from .cpu import cpu_sparse_attention
from .reference import torch_sparse_attention


def _cpu_supports(q, *args) -> str | None:
    return None if q.device.type == "cpu" else f"tensors are on {q.device.type}, not cpu"


def _triton(*args, config=None):
    from .triton import triton_sparse_attention  # imported on first use: Triton may be absent
    return triton_sparse_attention(*args, config=config)


def _triton_supports(*args) -> str | None:
    try:
        from .triton import supports
    except ImportError as e:
        return f"the Triton sparse attention kernel is not importable: {e}"
    return supports(*args)


def _triton_fits(cfg, q, k, v, scale, q_offset, block, *rest) -> bool:
    return cfg["BLOCK_N"] <= block and block % cfg["BLOCK_N"] == 0


KERNEL = register(Kernel(
    space.KERNEL_NAME, torch_sparse_attention,
    {"cpu": Implementation(cpu_sparse_attention, _cpu_supports, ConfigSpace(space.CPU_SPACE, space.default_config)),
     "triton": Implementation(_triton, _triton_supports,
                              ConfigSpace(space.TRITON_SPACE, space.triton_default_config, _triton_fits))},
    problem=space.problem, features=space.features, tolerance=space.tolerance, example=space.example_inputs,
    check=space.check,))

from . import op  # noqa: E402,F401  (registers the custom op)
