"""Tuned linear (exact): every CPU `nn.Linear` runs on `adaptc::linear`, the GEMM measured fastest for its shape.

nn.Linear calls ATen's addmm, which is MKL's SGEMM on x86; on AMD EPYC that takes a slow path, and
oneDNN's GEMM on a weight reordered once into its blocked layout is 1.2-3.5x faster from 8 rows up
(fp32) and 1.03-2.3x in bf16 (benchmarks/results/linear-*.md). Each layer becomes an `AdaptcLinear`: the
same module (an nn.Linear subclass holding the same weight Parameter, so state_dict, isinstance checks
and tied weights are unchanged) whose forward calls the op; which GEMM runs is the kernel's tuned
config per (rows, shape, dtype, threads), so decode rows keep MKL's GEMV where it wins. The packed
copy costs memory (up to the layers' weight bytes, in the report) and is made again if a weight is
edited in place. On a GPU F.linear already calls cuBLAS: there is nothing to do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels  # noqa: F401  (registers adaptc::linear)
from ..kernels.linear.op import run_linear, traced
from ..kernels.linear.space import PACKED_DTYPES
from ..runtime.module import CompiledModule
from ._base import CompileContext, ModuleEdit, Pass, Plan, Site
from ._config import PassConfig


def _around(cls: type, layer: nn.Module, *sizes: str) -> nn.Module:
    """A `cls` holding `layer`'s own weight and bias Parameters (nothing is copied or initialised)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name in sizes:
        setattr(new, name, getattr(layer, name))
    new.weight = layer.weight
    new.register_parameter("bias", layer.bias)
    return new.train(layer.training)


def on_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Through the op where a graph must hold it or gradients are wanted (its autograd formula), else
    straight to its body."""
    if traced(x) or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return torch.ops.adaptc.linear(x, weight, bias)
    return run_linear(x, weight, bias)


class AdaptcLinear(nn.Linear):
    """nn.Linear on adaptc::linear."""

    @classmethod
    def of(cls, linear: nn.Linear) -> "AdaptcLinear":
        return _around(cls, linear, "in_features", "out_features")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return on_op(x, self.weight, self.bias)


try:  # transformers' Conv1D: GPT-2's layers, a linear with its weight stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:
    Conv1D = None

if Conv1D is not None:
    class AdaptcConv1D(Conv1D):
        """The Conv1D on adaptc::linear with its weight's transposed view (packed once, like any weight)."""

        @classmethod
        def of(cls, conv: nn.Module) -> "AdaptcConv1D":
            return _around(cls, conv, "nf", "nx")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return on_op(x, self.weight.t(), self.bias)


LAYERS = (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)


def swapped(module: nn.Module) -> nn.Module:
    return AdaptcLinear.of(module) if type(module) is nn.Linear else AdaptcConv1D.of(module)


@dataclass(frozen=True)
class TunedLinearConfig(PassConfig):
    """tuned_linear has no options: the tuner picks the GEMM per shape, and verification checks the result."""


@dataclass
class TunedLinearPlan(Plan):
    """Nothing per layer: the op picks its GEMM per call from the tuned configs."""


class TunedLinear(Pass):
    name = "tuned_linear"
    exact = True
    config_class = TunedLinearConfig
    plan_class = TunedLinearPlan

    def match(self, ctx: CompileContext) -> list[Site]:
        compiled = [p for p, m in ctx.working.named_modules() if isinstance(m, CompiledModule)]
        return [Site(path, m) for path, m in ctx.working.named_modules()
                if type(m) in LAYERS and m.weight.device.type == "cpu" and m.weight.dtype in PACKED_DTYPES
                and not any(path.startswith(f"{c}.") for c in compiled)]

    def no_sites_reason(self) -> str:
        return "no float32/bfloat16 nn.Linear (or transformers Conv1D) on the CPU (on a GPU, F.linear already calls cuBLAS)"

    def check(self, ctx: CompileContext, site: Site) -> TunedLinearPlan:
        return TunedLinearPlan(details={"linear_weight_bytes": _weight_bytes(ctx)})

    def apply(self, ctx: CompileContext, site: Site, plan: TunedLinearPlan, edit: ModuleEdit) -> None:
        edit.replace(site.path, swapped(site.module))

    def rebuild(self, module: nn.Module, plan: TunedLinearPlan, model: nn.Module) -> nn.Module:
        return swapped(module)


def _weight_bytes(ctx: CompileContext) -> int:
    """What the packed copies may add at most: every float linear weight once (tied ones once each use)."""
    return ctx.once("tuned_linear_bytes", lambda: sum(
        m.weight.numel() * m.weight.element_size() for m in ctx.original.modules()
        if type(m) in LAYERS and m.weight.dtype in PACKED_DTYPES))
