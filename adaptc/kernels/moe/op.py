"""`adaptc::fused_moe`: the one op every fused MoE block calls.

A `torch.library.custom_op`, so torch.export and torch.compile see a single opaque node with a
fake (meta) implementation for shapes; at run time it dispatches through the kernel registry to
Triton (CUDA, or CPU tensors under TRITON_INTERPRET=1), the grouped CPU implementation, or the
plain-torch reference.
"""
from __future__ import annotations

import torch

from .._registry import KERNELS, note_call
from .space import KERNEL_NAME, moe_dims


@torch.library.custom_op("adaptc::fused_moe", mutates_args=())
def fused_moe(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              w13: torch.Tensor, w2: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """out[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden[t]).

    hidden [T, H]; topk_weights [T, K] float; topk_ids [T, K] int32/int64; w13 [E, 2I, H] (gate rows
    first) when gated else [E, I, H]; w2 [E, H, I]. Returns [T, H] in hidden's dtype.
    """
    args = (hidden, topk_weights, topk_ids, w13, w2, activation, gated)
    moe_dims(*args)
    kernel = KERNELS[KERNEL_NAME]
    impl, fn = kernel.select(hidden.device.type, *args)
    note_call(kernel, impl, args)
    return fn(*args)


@fused_moe.register_fake
def _(hidden, topk_weights, topk_ids, w13, w2, activation, gated):
    torch._check(hidden.dim() == 2 and topk_ids.shape[0] == hidden.shape[0])
    return hidden.new_empty(hidden.shape)
