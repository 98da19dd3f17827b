"""Calibration of per-head sparse attention patterns (for the `sparse_attention` pass).

Two steps, both on the user's calibration batches:
1. `recovered_mass`: run the model once with exact attention while measuring, for every attention
   module, head and candidate pattern, the share of the attention mass (softmax probability) the
   pattern's blocks hold — where a head really looks.
2. `patterns_at(tau)`: each head takes the cheapest candidate that keeps at least `tau` of its mass
   (else it stays dense); the pass then searches `tau` for the sparsest setting whose end-to-end
   next-token agreement with the original meets the quality target.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.sparse_attention.reference import select_blocks

BLOCK = 64
DENSE = (0, 1 << 20, 0)
# (sinks, window, topk) in blocks, cheapest first; DENSE when none keeps enough mass.
CANDIDATES: tuple[tuple[int, int, int], ...] = (
    (1, 1, 0), (1, 2, 0), (1, 1, 2), (1, 4, 0), (1, 2, 2), (1, 2, 4), (1, 4, 4), (1, 8, 0), (1, 4, 8), (1, 8, 8),
)


@dataclass(frozen=True)
class HeadPattern:
    block: int
    sinks: tuple[int, ...]
    window: tuple[int, ...]
    topk: tuple[int, ...]

    def dense_heads(self) -> int:
        return sum(w >= DENSE[1] for w in self.window)

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block, "sinks": list(self.sinks), "window": list(self.window), "topk": list(self.topk)}


@contextlib.contextmanager
def attention_hook(model: nn.Module, fn) -> Iterator[None]:
    """Run `model` with Hugging Face attention going through `fn(module, q, k, v, mask, scaling, ...)`."""
    from ..passes.attention_fusion import register_attention

    name = f"adaptc_hook_{id(fn)}"
    register_attention(name, fn)
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ kk.float().transpose(-1, -2)) * scale
    L, Lk = q.shape[2], k.shape[2]
    visible = torch.ones(L, Lk, dtype=torch.bool, device=q.device).tril(Lk - L)
    if mask is not None and mask.dtype == torch.bool:
        visible = visible & mask
    return scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num_(0.0)


def recovered_mass(model: nn.Module, batches: Iterable[Any], block: int = BLOCK) -> dict[str, torch.Tensor]:
    """Per attention module path: [candidates, heads] mean share of attention mass each pattern keeps
    (over the query blocks where the pattern drops something; 1.0 where it never does)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    paths = {m: p for p, m in model.named_modules()}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}

    def measure(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if query.shape[2] > block:  # prefill: the pattern's choices matter; decode steps are not calibrated
            p = _probs(query, key, scale, attention_mask)                # [B, H, L, Lk]
            B, H, L, Lk = p.shape
            nq, nk = -(-L // block), -(-Lk // block)
            mass = F.pad(p, (0, nk * block - Lk, 0, nq * block - L)).view(B, H, nq, block, nk, block).sum((3, 5))
            rows = F.pad(torch.ones(L), (0, nq * block - L)).view(nq, block).sum(1)
            mass = mass / rows[:, None]                                  # [B, H, nq, nk]: per query, mean
            kept, used = [], []
            for s, w, t in CANDIDATES:
                sel = select_blocks(query, key, scale, Lk - L, block, [s] * H, [w] * H, [t] * H)
                drops = torch.arange(Lk - L, Lk, block).div(block, rounding_mode="floor")[:nq] + 1 > s + w + t
                kept.append(((mass * sel).sum(-1) * drops).sum((0, 2)))  # [H]
                used.append(drops.sum() * B * torch.ones(H))
            path = paths[module]
            sums[path] = sums.get(path, 0) + torch.stack(kept)
            counts[path] = counts.get(path, 0) + torch.stack(used)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    with attention_hook(model, measure), torch.no_grad():
        for batch in batches:
            model(*batch.args, **batch.kwargs)
    return {path: torch.where(counts[path] > 0, sums[path] / counts[path].clamp(min=1), 1.0) for path in sums}


def patterns_at(recovered: dict[str, torch.Tensor], tau: float, block: int = BLOCK) -> dict[str, HeadPattern]:
    """Per module: each head's cheapest candidate that keeps at least `tau` of its mass (else dense)."""
    out = {}
    for path, kept in recovered.items():
        heads = []
        for h in range(kept.shape[1]):
            ok = (kept[:, h] >= tau).nonzero()
            heads.append(CANDIDATES[int(ok[0])] if ok.numel() else DENSE)
        s, w, t = (tuple(x) for x in zip(*heads))
        out[path] = HeadPattern(block, s, w, t)
    return out


def density(patterns: dict[str, HeadPattern], length: int) -> float:
    """Share of the causal key blocks the patterns read over one sequence of `length` tokens."""
    read = total = 0
    for p in patterns.values():
        n = -(-length // p.block)
        for s, w, t in zip(p.sinks, p.window, p.topk):
            read += sum(min(i + 1, s + w + t) for i in range(n))
            total += n * (n + 1) // 2
    return read / max(total, 1)


@torch.no_grad()
def next_token_quality(model: nn.Module, reference: list[torch.Tensor], batches: list[Any]) -> dict[str, float]:
    """Agreement of `model`'s next-token argmax with `reference` logits, and both perplexities on the text."""
    agree = count = 0
    nll = nll_ref = 0.0
    for batch, ref in zip(batches, reference):
        logits = model(*batch.args, **batch.kwargs).logits[:, :-1].float()
        ref = ref[:, :-1].float()
        ids = _input_ids(batch)[:, 1:]
        agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        count += ids.numel()
        nll += float(F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="sum"))
        nll_ref += float(F.cross_entropy(ref.flatten(0, 1), ids.flatten(), reduction="sum"))
    return {"agreement": agree / count, "perplexity": float(torch.tensor(nll / count).exp()),
            "perplexity_original": float(torch.tensor(nll_ref / count).exp()), "tokens": count}


def _input_ids(batch: Any) -> torch.Tensor:
    ids = batch.kwargs.get("input_ids", batch.args[0] if batch.args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError("sparse_attention calibration batches must carry input_ids [batch, tokens]")
    return ids
