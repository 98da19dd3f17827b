"""`adaptc::linear`: nn.Linear's math, on the GEMM the tuner picked for this shape on this machine.

A `torch.library.custom_op` (export and torch.compile see one opaque node, shaped by the fake impl;
the weight stays a graph input, so a saved graph holds the real weight and no packed copy). At run
time it dispatches through the kernel registry: the CPU implementation (oneDNN prepacked or ATen),
else the reference (F.linear: cuBLAS on a GPU).
"""
from __future__ import annotations

from typing import Callable

import torch

from .._registry import KERNELS, config_for, configs_generation, kernel_preference_now, note_call, tracing_calls
from .cpu import backend
from .reference import check_args
from .space import KERNEL_NAME, bucket, cpu_default_config, problem


_chosen: dict[tuple, Callable[..., torch.Tensor]] = {}


def run_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's body. Eager callers on plain tensors call it directly, and the implementation and
    config chosen for a problem are memoised (until a config changes): a layer's call then costs what
    nn.Linear's does, where the custom op's dispatch and the registry's lookups added ~20-40 us, 5-10%
    of a 135M-parameter LM's decode step over its 211 layers."""
    rows = x.numel() // max(x.shape[-1], 1)
    key = (x.device.type, x.dtype, x.shape[-1:], weight.dtype, weight.shape, None if bias is None else bias.shape,
           bucket(rows), torch.get_num_threads(), kernel_preference_now(), configs_generation())
    fn = _chosen.get(key)
    if fn is None or tracing_calls():
        args = (x, weight, bias)
        check_args(*args)
        kernel = KERNELS[KERNEL_NAME]
        impl, fn = kernel.select(x.device.type, *args)
        note_call(kernel, impl, args)
        if impl == "cpu":
            fn = backend(config_for(KERNEL_NAME, "cpu", problem(*args), "cpu", lambda: cpu_default_config(*args)))
        if len(_chosen) > 4096:  # shapes are few in a model; bound it anyway
            _chosen.clear()
        _chosen[key] = fn
    return fn(x, weight, bias)


@torch.library.custom_op("adaptc::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T + bias [N] -> [..., N]."""
    out = run_linear(x, weight, bias)
    return out.clone() if out is x else out  # a custom op may not return an input


def traced(x: torch.Tensor) -> bool:
    """Whether this call is being traced (dynamo, export's fake tensors, fx proxies): the graph must
    hold the op node; plain eager calls skip its dispatch."""
    return type(x) is not torch.Tensor or torch.compiler.is_compiling()


@linear.register_fake
def _(x, weight, bias=None):
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1])
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    """nn.Linear's gradients, so a compiled module can still be fine-tuned (not through the packed GEMM)."""
    x, weight = ctx.saved_tensors
    grad_x = grad @ weight if ctx.needs_input_grad[0] else None
    grad_w = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
    grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_w, grad_b


linear.register_autograd(_backward, setup_context=_setup)
