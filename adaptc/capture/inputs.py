"""Example inputs and their dynamic dims; fresh random inputs of other batch / sequence sizes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class Inputs:
    args: tuple
    kwargs: dict

    @staticmethod
    def of(example_inputs: Any, example_kwargs: dict | None = None) -> "Inputs":
        if isinstance(example_inputs, dict) and example_kwargs is None:
            return Inputs((), dict(example_inputs))
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        return Inputs(tuple(example_inputs or ()), dict(example_kwargs or {}))

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(x, torch.Tensor)]

    def dynamic_dims(self) -> dict[int, tuple[int, ...]]:
        """Per tensor leaf (by position among tensor leaves), the dims that vary: batch, sequence."""
        return {i: _dynamic_dims(t) for i, t in enumerate(self.tensors())}

    def batch_seq(self) -> tuple[int, int | None]:
        first = self.tensors()[0]
        return first.shape[0], (first.shape[1] if len(_dynamic_dims(first)) > 1 else None)

    def resized(self, batch: int, seq: int | None, generator: torch.Generator, vocab: int | None = None) -> "Inputs":
        """Fresh random inputs shaped like these but with another batch / sequence size."""

        def fresh(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            shape = list(x.shape)
            dims = _dynamic_dims(x)
            shape[0] = batch
            if seq is not None and len(dims) > 1:
                shape[1] = seq
            if x.dtype == torch.bool:
                return torch.ones(shape, dtype=x.dtype, device=x.device)
            if not x.is_floating_point():
                if bool(((x == 0) | (x == 1)).all()) and x.ndim == 2 and x.numel() > 1 and int(x.max()) == 1:
                    return torch.ones(shape, dtype=x.dtype, device=x.device)  # an attention mask
                # token ids span the vocabulary; small codes (token_type_ids, segment ids) keep their range
                ids = vocab and int(x.max()) > 1
                high = vocab if ids else int(x.max()) + 1
                low = 0 if ids else int(x.min())
                return torch.randint(low, max(high, low + 1), shape, generator=generator).to(x.device, x.dtype)
            std, mean = (x.float().std(), x.float().mean()) if x.numel() > 1 else (1.0, 0.0)
            return (torch.randn(shape, generator=generator) * std + mean).to(x.device, x.dtype)

        args, kwargs = pytree.tree_map(fresh, (self.args, self.kwargs))
        return Inputs(tuple(args), kwargs)


def _dynamic_dims(t: torch.Tensor) -> tuple[int, ...]:
    # Batch is dim 0. Token ids / masks [B, S] and activations [B, S, H] also vary in dim 1.
    if t.ndim == 0:
        return ()
    if t.ndim >= 2 and (not t.is_floating_point() or t.ndim == 3):
        return (0, 1)
    return (0,)


def random_inputs_like(inputs: Inputs, count: int, seed: int, vocab: int | None = None) -> list[Inputs]:
    """`count` fresh inputs at other batch / sequence sizes than the example's."""
    gen = torch.Generator().manual_seed(seed)
    batch, seq = inputs.batch_seq()
    sizes = [(batch + 1, seq + 3 if seq else None), (max(1, batch - 1) if batch > 1 else 2, max(1, seq - 1) if seq else None),
             (batch + 2, seq * 2 if seq else None)]
    return [inputs.resized(b, s, gen, vocab) for b, s in sizes[:count]]
