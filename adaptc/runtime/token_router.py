"""Token-router runtime for encoders: tokens a router ranks low leave the batch for the rest of the stack.

`RoutedEncoder` replaces a BERT-like encoder (`.layer` is the same ModuleList, so parameter names are
kept). Before a routed block each row keeps its `keep[i]` share (of its real tokens) that the block's
router scores highest; the kept tokens are gathered into a dense [rows, kept, D] batch (with a key mask
of its own) and run through the rest of the stack, the dropped ones keep their last state and rejoin
the output for pooling ([CLS] is never dropped; a mean pools every real token, a dropped one at its
last state mapped by that block's lens onto the last block's state). A row's kept set depends on its own tokens only, so a result never depends on its
neighbours in the batch. Padding leaves at the first routed block: the blocks after it never see it.

With early exit on the same encoder (the pass runs after early_exit), this loop also runs the exits:
`exit_runtime` is the EarlyExitEncoder it replaced, asked the same question after each exit block.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..analysis.kv_projection import kv_projection_for, no_kv_projection_reason
from ..errors import AdaptcError
from .early_exit import EarlyExitEncoder, key_padding
from .stack_controller import StackCall, StackPolicy, first, install_policy, take_rows

ENCODER_KINDS = ("classifier", "embedding")


@dataclass
class RouterPlan:
    kind: str            # classifier | embedding
    keep: list[float]    # per block: the share of a row's real tokens that runs it (1.0: every live token)

    def routed(self) -> list[int]:
        return [i for i, k in enumerate(self.keep) if k < 1.0]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "keep": [float(k) for k in self.keep]}

    @classmethod
    def from_dict(cls, d: Any) -> "RouterPlan":
        """The inverse of to_dict; a saved plan is data from a file, so every field is checked."""
        if not isinstance(d, dict) or "kind" not in d or "keep" not in d:
            raise ValueError("a router plan is an object with kind and keep")
        kind, keep = d["kind"], d["keep"]
        if kind not in ENCODER_KINDS:
            raise ValueError(f"router plan kind {kind!r} is not one of {ENCODER_KINDS}")
        if not isinstance(keep, list) or not keep or not all(
                isinstance(k, (int, float)) and not isinstance(k, bool) and 0.0 < k <= 1.0 for k in keep):
            raise ValueError(f"router plan keep {keep!r} is not a list of shares in (0, 1]")
        if any(b > a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"router plan keep {keep!r} grows with depth: a dropped token never comes back")
        return cls(kind, [float(k) for k in keep])


@dataclass
class SkipPlan:
    """Causal LMs: per block the router score below which a token skips it (-inf: nobody skips it)."""

    thresholds: list[float]
    kind: str = "causal_lm"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "thresholds": [None if math.isinf(t) else float(t) for t in self.thresholds]}

    @classmethod
    def from_dict(cls, d: Any) -> "SkipPlan":
        if not isinstance(d, dict) or d.get("kind") != "causal_lm" or "thresholds" not in d:
            raise ValueError("a skip plan is an object with kind 'causal_lm' and thresholds")
        t = d["thresholds"]
        if not isinstance(t, list) or not t or not all(
                x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)) for x in t):
            raise ValueError(f"skip plan thresholds {t!r} are not numbers (or null: never skip)")
        return cls([-math.inf if x is None else float(x) for x in t])


def plan_from_dict(d: Any) -> "RouterPlan | SkipPlan":
    return SkipPlan.from_dict(d) if isinstance(d, dict) and d.get("kind") == "causal_lm" else RouterPlan.from_dict(d)


@dataclass
class RouterStats:
    """What the runtime ran since the last reset, per block: real tokens run, and the sum over rows of
    squared token counts (what attention pays)."""

    rows: int = 0
    tokens: list[int] = field(default_factory=list)
    tokens_squared: list[int] = field(default_factory=list)
    real_tokens: int = 0  # real tokens entering the stack

    def reset(self, blocks: int) -> None:
        self.rows, self.real_tokens = 0, 0
        self.tokens, self.tokens_squared = [0] * blocks, [0] * blocks

    def keep_rates(self) -> list[float]:
        return [t / max(self.real_tokens, 1) for t in self.tokens]


class TokenScorer(nn.Module):
    """One routed block's router: a linear score of the state entering the block (higher = keep)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.score = nn.Linear(hidden, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.score(h).squeeze(-1)


def compact_mask(like: Any, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [b, 1, K, K] attention mask of the format the encoder was given (boolean / additive) that lets
    every query see the valid keys of its row."""
    keys = valid[:, None, None, :].expand(valid.shape[0], 1, valid.shape[1], valid.shape[1])
    if isinstance(like, torch.Tensor) and like.dtype != torch.bool:
        return torch.zeros(keys.shape, dtype=like.dtype, device=valid.device).masked_fill(~keys, torch.finfo(like.dtype).min)
    return keys


class RoutedEncoder(nn.Module):
    """Drop-in for a BERT-like encoder (or the EarlyExitEncoder that early_exit put there)."""

    def __init__(self, encoder: nn.Module, plan: RouterPlan, routers: nn.ModuleList, lenses: nn.ModuleList | None = None):
        super().__init__()
        self.layer = encoder.layer
        self.config = getattr(encoder, "config", None)
        self.routers = routers
        # Embeddings: a token dropped before block i rejoins through lenses[i], an affine map of its state
        # onto the last block's (raw states of different depths do not pool together: MiniLM's block-1
        # and block-6 states have cosine ~0.2).
        self.lenses = lenses
        self.plan = plan
        exits = encoder if isinstance(encoder, EarlyExitEncoder) else None
        if exits is not None:
            self.exit_heads = exits.exit_heads  # same parameter names as early exit alone
        object.__setattr__(self, "exit_runtime", exits)  # not a submodule: its layers are ours
        self.stats = RouterStats()
        self.stats.reset(len(self.layer))
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        h, mask = hidden_states, attention_mask
        batch, seq, width = h.shape
        valid = key_padding(attention_mask, batch, seq, h.device)
        length = valid.sum(1)                       # real tokens per row (for keep shares)
        full = h.clone()                            # every token's last state: the output
        rows = torch.arange(batch, device=h.device)  # original row of each live row
        pos = torch.arange(seq, device=h.device).expand(batch, seq)  # position of each live token
        live = valid                                # [b, K]: a real token still in the stack
        kind, exits = self.plan.kind, self.exit_runtime
        dropped_sum = h.new_zeros(batch, width)     # embeddings: dropped tokens' last states, summed
        tokens, squares = [0] * len(self.layer), [0] * len(self.layer)
        for i, layer in enumerate(self.layer):
            keep = self.plan.keep[i]
            if keep < 1.0:
                h, pos, live, dropped_sum, mask = self._route(
                    i, keep, h, pos, live, length[rows], full, rows, dropped_sum, mask)
            count = live.sum(1)
            tokens[i], squares[i] = int(count.sum()), int((count * count).sum())
            h_in = h
            h = first(layer(h, mask, *args, **kwargs))
            e = exits.exit_after(i) if exits is not None else None
            if e is None:
                continue
            done = exits.leaving(e, self._readout(kind, h_in, live, dropped_sum, length[rows]),
                                 self._readout(kind, h, live, dropped_sum, length[rows]))
            if not bool(done.any()):
                continue
            # the exit's head maps block-e states onto the last block's: the live tokens' (dropped ones
            # already hold their rejoin state)
            self._write(full, rows[done], pos[done], live[done], exits.exit_heads[e](h[done]))
            with self._lock:
                exits.stats.histogram[e] += int(done.sum())
            stay, current = ~done, h.shape[0]
            h, pos, live, rows, dropped_sum = h[stay], pos[stay], live[stay], rows[stay], dropped_sum[stay]
            mask, args, kwargs = take_rows(mask, stay, current), take_rows(args, stay, current), take_rows(kwargs, stay, current)
            if rows.numel() == 0:
                break
        if rows.numel():
            self._write(full, rows, pos, live, h)
            if exits is not None:
                with self._lock:
                    exits.stats.histogram[-1] += rows.numel()
        with self._lock:
            s = self.stats
            s.rows += batch
            s.real_tokens += int(length.sum())
            for i in range(len(self.layer)):
                s.tokens[i] += tokens[i]
                s.tokens_squared[i] += squares[i]
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=full)

    def _route(self, i, keep, h, pos, live, length, full, rows, dropped_sum, mask):
        """Keep each row's top `keep` share of its real tokens by router score ([CLS], position 0, always);
        the others keep their last state in `full` and leave the dense batch."""
        b, K = live.shape
        want = torch.clamp(torch.ceil(keep * length.to(torch.float32)).long(), min=1)
        want = torch.minimum(want, live.sum(1))
        if bool((want == live.sum(1)).all()) and bool(live.all()):
            return h, pos, live, dropped_sum, mask
        scores = self.routers[i](h).float().masked_fill(~live, -math.inf)
        scores = scores.masked_fill(pos == 0, math.inf)
        width = int(want.max())
        top = scores.topk(width, dim=1).indices                          # [b, width], best first
        kept = torch.arange(width, device=h.device).unsqueeze(0) < want.unsqueeze(1)
        order = torch.where(kept, top, top + K).argsort(dim=1)          # kept first, in position order
        top, kept = top.gather(1, order), kept.gather(1, order)
        stays = torch.zeros_like(live).scatter(1, top, kept)             # [b, K]: kept
        leaves = live & ~stays
        rejoin = h[leaves]
        if self.lenses is not None:  # only the leaving tokens pay the lens
            rejoin = self.lenses[i](rejoin)
        full[rows.unsqueeze(1).expand_as(pos)[leaves], pos[leaves]] = rejoin
        if self.plan.kind == "embedding":
            local = torch.arange(b, device=h.device).unsqueeze(1).expand_as(pos)[leaves]
            dropped_sum = dropped_sum.index_add(0, local, rejoin)
        h = h.gather(1, top.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        pos = pos.gather(1, top)
        mask = compact_mask(mask, kept, h.dtype)
        return h, pos, kept, dropped_sum, mask

    @staticmethod
    def _write(full: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, which: torch.Tensor, h: torch.Tensor) -> None:
        """full[row, position] = h for the tokens `which` ([b, K] bool) of the live rows."""
        r = rows.unsqueeze(1).expand_as(pos)
        full[r[which], pos[which]] = h[which]

    @staticmethod
    def _readout(kind: str, h: torch.Tensor, live: torch.Tensor, dropped_sum: torch.Tensor,
                 length: torch.Tensor) -> torch.Tensor:
        """What an exit reads: [CLS] (live at index 0), or the mean over every real token with dropped
        tokens at their last state."""
        if kind == "classifier":
            return h[:, 0]
        kept = (h * live.unsqueeze(-1).to(h.dtype)).sum(1)
        return (kept + dropped_sum) / length.clamp(min=1).unsqueeze(-1).to(h.dtype)


def routed_encoder_of(model: nn.Module) -> RoutedEncoder | None:
    return next((m for m in model.modules() if isinstance(m, RoutedEncoder)), None)


# -- causal LMs: per-token skips on the stack controller ---------------------------------------------

ROUTERS_ATTR = "adaptc_token_routers"


@dataclass
class SkipStats:
    """Per block, since the last reset: live tokens the router scored, and those that skipped the block."""

    seen: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    def reset(self, blocks: int) -> None:
        self.seen, self.skipped = [0] * blocks, [0] * blocks

    def skip_rates(self) -> list[float]:
        return [k / n if n else 0.0 for k, n in zip(self.skipped, self.seen)]


class TokenSkipPolicy(StackPolicy):
    """Before block i, a live token whose router score (of its own normed state: causal, it never looks
    ahead) is below the block's threshold skips it; the controller keeps its state and projects the K/V
    later tokens read from it, so cached and uncached generation compute the same function."""

    name = "token_router"

    def __init__(self, plan: SkipPlan, norm: nn.Module, routers: nn.ModuleList):
        self.plan, self.norm, self.routers = plan, norm, routers
        self.stats = SkipStats()
        self.stats.reset(len(plan.thresholds))

    def begin(self, tokens: torch.Size, device: torch.device) -> list[list[int]]:
        return [[0, 0] for _ in self.plan.thresholds]

    def acts_before(self, i: int) -> bool:
        return not math.isinf(self.plan.thresholds[i])

    def skip(self, state, i, h, where):
        skips = self.routers[i](self.norm(h)) < self.plan.thresholds[i]
        state[i][0] += h.shape[0]
        state[i][1] += int(skips.sum())
        return skips

    def end(self, state, call: StackCall) -> None:
        for i, (seen, skipped) in enumerate(state):
            self.stats.seen[i] += seen
            self.stats.skipped[i] += skipped


def install_lm_skips(model: nn.Module, layers: nn.ModuleList, plan: SkipPlan, norm: nn.Module, routers: nn.ModuleList,
                     set_attr=setattr) -> TokenSkipPolicy:
    """Add the skip policy to the stack's controller and register `routers` on `model` (as
    `adaptc_token_routers`, so adaptc.save writes their weights). set_attr: ModuleEdit.set_attr."""
    kv = kv_projection_for(layers)
    if kv is None:
        raise AdaptcError(f"{no_kv_projection_reason(layers)}: skipped tokens would leave holes in the cache")
    set_attr(model, ROUTERS_ATTR, routers)
    policy = TokenSkipPolicy(plan, norm, routers)
    install_policy(layers, policy, kv, set_attr=set_attr)
    return policy


def lm_skips_of(model: nn.Module) -> TokenSkipPolicy | None:
    from .stack_controller import controller_of

    controller = controller_of(model)
    return controller.policy(TokenSkipPolicy) if controller is not None else None

