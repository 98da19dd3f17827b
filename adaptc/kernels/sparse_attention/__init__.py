"""Approximate block-sparse attention (sinks + local window + top-k blocks per head): `adaptc::sparse_attention`.

The patterns are chosen per head by calibration (adaptc.calibrate.attention_sparsity); a reference and a
CPU implementation. No Triton implementation yet: on CUDA the op runs its reference (dense SDPA with the
pattern's mask), which is correct but not faster.
"""
from __future__ import annotations

from .._registry import ConfigSpace, Implementation, Kernel, register
from . import space
from .cpu import cpu_sparse_attention
from .reference import torch_sparse_attention


def _cpu_supports(q, *args) -> str | None:
    return None if q.device.type == "cpu" else f"tensors are on {q.device.type}, not cpu"


KERNEL = register(Kernel(
    space.KERNEL_NAME, torch_sparse_attention,
    {"cpu": Implementation(cpu_sparse_attention, _cpu_supports, ConfigSpace(space.CPU_SPACE, space.default_config))},
    problem=space.problem, features=space.features, tolerance=space.tolerance, example=space.example_inputs,
))

from . import op  # noqa: E402,F401  (registers the custom op)
