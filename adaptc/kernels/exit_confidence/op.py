"""`adaptc::exit_confidence`: how sure an exit's LM head is, without writing its logits.

A `torch.library.custom_op` (export and torch.compile see one opaque node, shaped by the fake impl);
at run time it dispatches through the kernel registry to Triton (CUDA, or CPU tensors under
TRITON_INTERPRET=1), the chunked CPU implementation, or the plain-torch reference.
"""
from __future__ import annotations

import torch

from .._registry import KERNELS, note_call
from .reference import check_args
from .space import KERNEL_NAME


@torch.library.custom_op("adaptc::exit_confidence", mutates_args=())
def exit_confidence(hidden: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Confidence of softmax(hidden @ weight.T + bias) for hidden [N, D], weight [V, D], bias [V] or None.

    Returns (max_prob [N] fp32, margin [N] fp32 = top-1 minus top-2 probability, top1 [N] int64).
    """
    args = (hidden, weight, bias)
    check_args(*args)
    kernel = KERNELS[KERNEL_NAME]
    impl, fn = kernel.select(hidden.device.type, *args)
    note_call(kernel, impl, args)
    return fn(*args)


@exit_confidence.register_fake
def _(hidden, weight, bias=None):
    torch._check(hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1])
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty(n, dtype=torch.int64))
