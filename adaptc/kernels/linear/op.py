"""`adaptc::linear`: nn.Linear's math, on the GEMM the tuner picked for this shape on this machine.

A `torch.library.custom_op` (export and torch.compile see one opaque node, shaped by the fake impl;
the weight stays a graph input, so a saved graph holds the real weight and no packed copy). At run
time it dispatches through the kernel registry: the CPU implementation (oneDNN prepacked or ATen),
else the reference (F.linear: cuBLAS on a GPU).
"""
from __future__ import annotations

import torch

from .._registry import KERNELS, note_call
from .reference import check_args
from .space import KERNEL_NAME


@torch.library.custom_op("adaptc::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T + bias [N] -> [..., N]."""
    args = (x, weight, bias)
    check_args(*args)
    kernel = KERNELS[KERNEL_NAME]
    impl, fn = kernel.select(x.device.type, *args)
    note_call(kernel, impl, args)
    out = fn(*args)
    return out.clone() if out is x else out  # a custom op may not return an input


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
