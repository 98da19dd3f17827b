"""Example inputs and their dynamic dims; fresh random inputs of other batch / sequence sizes that
the model accepts (check_inputs asks the model, within its config's position limit)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class Inputs:
    args: tuple
    kwargs: dict
    static_seq: bool = False  # the model takes only the example's sequence length (check_inputs found out)

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
        return first.shape[0], (first.shape[1] if len(_dynamic_dims(first)) > 1 and not self.static_seq else None)

    def resized(self, batch: int, seq: int | None, generator: torch.Generator, vocab: int | None = None) -> "Inputs":
        """Fresh random inputs shaped like these but with another batch / sequence size. The sequence is
        dim 1 of the tensors as long as the first one's: another length (decoder ids, mel bins) is kept."""
        length = self.batch_seq()[1] if self.tensors() else None
        seq = None if length is None else seq

        def fresh(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            shape = list(x.shape)
            dims = _dynamic_dims(x)
            shape[0] = batch
            if seq is not None and len(dims) > 1 and shape[1] == length:
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
        return Inputs(tuple(args), kwargs, self.static_seq)


def _dynamic_dims(t: torch.Tensor) -> tuple[int, ...]:
    # Batch is dim 0. Token ids / masks [B, S] and activations [B, S, H] also vary in dim 1.
    if t.ndim == 0:
        return ()
    if t.ndim >= 2 and (not t.is_floating_point() or t.ndim == 3):
        return (0, 1)
    return (0,)


# Where a config says how many positions a model has. Whisper's max_source_positions is not here: it
# counts encoder frames, a dim check_inputs learns is fixed by asking the model.
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "n_ctx")


def position_limit(config: Any) -> tuple[int, str] | None:
    """The longest sequence `config`'s model takes, and the field that says so."""
    for name in POSITION_LIMITS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def _sizes(batch: int, seq: int | None, limit: int | None) -> list[tuple[int, int | None]]:
    # Longer, shorter, twice as long. Past the limit: the limit, or shorter where the example is at it.
    smaller = max(1, batch - 1) if batch > 1 else 2
    if seq is None:
        return [(batch + 1, None), (smaller, None), (batch + 2, None)]
    return [(batch + 1, _within(seq + 3, seq, limit)), (smaller, max(1, seq - 1)), (batch + 2, _within(2 * seq, seq, limit))]


def _within(s: int, seq: int, limit: int | None) -> int:
    if limit is None or s <= limit:
        return s
    return limit if limit > seq else max(1, 2 * seq - s if 2 * seq - s >= 1 else seq // 2)


def random_inputs_like(inputs: Inputs, count: int, seed: int, vocab: int | None = None,
                       limit: int | None = None) -> list[Inputs]:
    """`count` fresh inputs at other batch / sequence sizes than the example's (sequences up to `limit`)."""
    gen = torch.Generator().manual_seed(seed)
    return [inputs.resized(b, s, gen, vocab) for b, s in _sizes(*inputs.batch_seq(), limit)[:count]]


def check_inputs(model: Any, inputs: Inputs, count: int, seed: int) -> list[Inputs]:
    """The example, then `count` fresh random inputs of other sizes that `model` takes.

    Which dims may vary is the model's answer, not the tensors' positions: sequences stay within the
    config's position limit (an example already at it is checked at shorter lengths), and a size the
    model rejects (mel bins, fixed frames, a fixed batch) is kept at the example's from then on. The
    example returned says what was learnt (static_seq) for the steps after (export, its smallest call).
    """
    if not inputs.tensors():
        return [inputs]
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    limit = (position_limit(config) or (None,))[0]
    gen = torch.Generator().manual_seed(seed)
    batch, seq = inputs.batch_seq()
    vary_batch, out = True, []
    for i in range(min(count, 3)):
        b, s = _sizes(batch, None if inputs.static_seq else seq, limit)[i]
        b = b if vary_batch else batch
        # as planned; shorter where longer was refused; the example's length; the example's sizes
        tries = [(b, s), (b, _within(s, seq, seq) if s and s > seq else s), (b, seq), (batch, seq)]
        for tb, ts in dict.fromkeys(tries):
            candidate = inputs.resized(tb, ts, gen, vocab)
            if _takes(model, candidate):
                break
        else:
            continue  # not even fresh values at the example's sizes: the example's own run will say why
        if s is not None and ts == seq != s:
            inputs = replace(inputs, static_seq=True)
        elif s is not None and s > seq and ts != s:
            limit = seq  # an unwritten limit: longer was refused, shorter taken
        vary_batch = vary_batch and tb == b
        out.append(replace(candidate, static_seq=inputs.static_seq))
    return [inputs, *out]


def _takes(model: Any, inputs: Inputs) -> bool:
    try:
        with torch.no_grad():
            model(*inputs.args, **inputs.kwargs)
    except Exception:  # any refusal: a shape check, a size mismatch, a missing position embedding
        return False
    return True
