"""Linear: `adaptc::linear`, x @ W.T + b on the GEMM that is fastest for the shape on this machine
(oneDNN on a prepacked weight, or ATen), with the plain-torch reference as oracle and fallback."""
from __future__ import annotations

from .._registry import ConfigSpace, Implementation, Kernel, register
from . import space
from .cpu import cpu_linear, packed_bytes, supports
from .reference import torch_linear

KERNEL = register(Kernel(
    space.KERNEL_NAME, torch_linear,
    {"cpu": Implementation(cpu_linear, supports, ConfigSpace(space.CPU_SPACE, space.cpu_default_config))},
    problem=space.problem, features=space.features, tolerance=space.tolerance, example=space.example_inputs,
    check=space.check, config_features=space.config_features,
))

from .op import linear  # noqa: E402  (registers the custom op)

__all__ = ["linear", "torch_linear", "cpu_linear", "packed_bytes", "KERNEL"]
