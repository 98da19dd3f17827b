"""Early-exit runtime: rows (encoders) or tokens (causal LMs) leave the layer stack at the first exit
whose confidence reaches its threshold.

Encoders (`EarlyExitEncoder` replaces the model's encoder): after an exit layer, the rows that exit
are written to the output (through their exit head) and compacted out of the batch; the rest go on.
A batch is never held to its slowest row, and a row's result never depends on its neighbours.

Causal LMs (`install_lm_exits` adds an `LMExitPolicy` to the stack's controller, runtime/stack_controller.py,
which gates the decoder layers in place): a token that exits keeps its hidden state frozen through the
remaining layers; after the last one its exit's adapter (a residual affine map
onto the last block's state, a "tuned lens") moves it, and the model's own final norm and LM head read
it - that is the exit head. The "learned" measure asks a linear predictor per exit whether the exit
agrees with the full model, so no exit evaluates the LM head at all (nor does "saturation"). The
layers it skips still need its keys/values for later tokens: the controller projects them from the
frozen state (CALM, Schuster et al., 2022), so cached and uncached generation compute the same
function. Encoders keep their own loop: leaving rows are compacted out of the batch, which a gate
inside the model's loop cannot do; they share the controller's row helpers (take_rows, first).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.kv_projection import kv_projection_for, no_kv_projection_reason
from ..analysis.layer_stack import KINDS, ClassifierTail  # noqa: F401  (ClassifierTail: re-exported)
from ..errors import AdaptcError
from .stack_controller import StackCall, StackPolicy, controller_of, first, install_policy, take_rows

MEASURES = ("softmax_max", "margin", "saturation", "learned")
FUSED_MAX_TOKENS = 64
LM_HEADS_ATTR = "adaptc_exit_heads"


@dataclass
class ExitPlan:
    kind: str                  # classifier | embedding | causal_lm
    exit_layers: list[int]     # a block index after which an exit is evaluated
    thresholds: list[float]    # one per exit; inf = never leave there
    measure: str               # one of MEASURES

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["thresholds"] = [None if math.isinf(t) else float(t) for t in self.thresholds]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ExitPlan":
        """The inverse of to_dict; a saved plan is data from a file, so every field is checked."""
        if not isinstance(d, dict):
            raise ValueError(f"exit plan is {type(d).__name__}, not a dict")
        missing = [k for k in ("kind", "exit_layers", "thresholds", "measure") if k not in d]
        if missing:
            raise ValueError(f"exit plan lacks {', '.join(missing)}")
        kind, layers, thresholds, measure = d["kind"], d["exit_layers"], d["thresholds"], d["measure"]
        if kind not in KINDS:
            raise ValueError(f"exit plan kind {kind!r} is not one of {KINDS}")
        if measure not in MEASURES:
            raise ValueError(f"exit plan measure {measure!r} is not one of {MEASURES}")
        if not isinstance(layers, list) or not all(isinstance(l, int) and l >= 0 for l in layers):
            raise ValueError(f"exit plan exit_layers {layers!r} are not block indices")
        if not isinstance(thresholds, list) or len(thresholds) != len(layers) or \
                not all(t is None or isinstance(t, (int, float)) for t in thresholds):
            raise ValueError(f"exit plan needs one threshold (a number, or null for never) per exit layer, got {thresholds!r}")
        return cls(kind, list(layers), [math.inf if t is None else float(t) for t in thresholds], measure)


@dataclass
class ExitStats:
    """What the runtime did since the last reset: rows/tokens leaving at each exit (last = full model)
    and, for LMs, the K/V propagation it paid for exited tokens."""

    histogram: list[int] = field(default_factory=list)
    kv_fill_tokens: int = 0
    kv_fill_seconds: float = 0.0

    def reset(self, exits: int) -> None:
        self.histogram, self.kv_fill_tokens, self.kv_fill_seconds = [0] * (exits + 1), 0, 0.0


def cosine01(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(0.0, 1.0)


def masked_mean(h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    w = valid.to(h.dtype).unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1).clamp(min=1.0)


def prob_signals(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    top = logits.float().softmax(-1).topk(min(2, logits.shape[-1]), dim=-1).values
    second = top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
    return {"softmax_max": top[:, 0], "margin": top[:, 0] - second, "top1": logits.argmax(-1)}


# -- encoders ---------------------------------------------------------------------------------------

class ExitAdapter(nn.Module):
    """Maps a block's output to an estimate of the last block's output: h + W h + b (W, b start at 0,
    so an untrained head is the raw state). Affine, so mean pooling commutes with it and the head can
    be trained and evaluated on the pooled vector alone."""

    def __init__(self, hidden: int):
        super().__init__()
        self.adapter = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.adapter(h)


def encoder_readout(kind: str, h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The vector the output is read from: [CLS] for classifiers, the masked mean for embeddings."""
    return h[:, 0] if kind == "classifier" else masked_mean(h, valid)


def encoder_signals(kind: str, head: ExitAdapter, tail: Callable | None, r_in: torch.Tensor,
                    r_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Confidence signals at one exit from the readout vectors entering and leaving its block; the
    pass calibrates on exactly these, so the runtime and the calibration cannot disagree."""
    signals = {"saturation": cosine01(r_out, r_in)}
    if kind == "classifier":
        signals.update(prob_signals(tail(head(r_out))))
    else:
        signals["embedding"] = head(r_out)
    return signals


def key_padding(attention_mask: Any, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """[B, S] bool (True = a real token) from the mask the encoder receives (None, 2-D, or 4-D
    boolean / additive)."""
    if not isinstance(attention_mask, torch.Tensor):
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    m = attention_mask
    if m.dim() == 4:  # what HF builds: True / 0.0 where a query may attend
        m = m[:, 0, 0, :]
        valid = m if m.dtype == torch.bool else m == 0
    else:  # a user-style 0/1 mask
        valid = m != 0
    return valid.expand(batch, seq)


class EarlyExitEncoder(nn.Module):
    """Drop-in for a BERT-like encoder. The encoder's own children are kept under their names (`.layer`;
    ALBERT's `.embedding_hidden_mapping_in` and `.albert_layer_groups`), so parameter names are kept;
    `steps` are the blocks in the order they run (ALBERT: its shared group, once per step) and `prelude`
    what runs before the first (ALBERT's input projection)."""

    def __init__(self, encoder: nn.Module, plan: ExitPlan, heads: nn.ModuleList, tail: nn.Module | None,
                 steps: nn.ModuleList | None = None, prelude: nn.Module | None = None):
        super().__init__()
        for name, child in encoder.named_children():
            self.add_module(name, child)
        self.config = getattr(encoder, "config", None)
        self.exit_heads = heads
        self.plan = plan
        # the model owns these (the pooler/classifier, the steps' modules, the projection): no second copy
        object.__setattr__(self, "_tail", tail)
        object.__setattr__(self, "_steps", list(steps if steps is not None else encoder.layer))
        object.__setattr__(self, "_prelude", prelude)
        self._output_type = None
        self.stats = ExitStats()
        self.stats.reset(len(plan.exit_layers))

    def forward(self, hidden_states: torch.Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        h, mask = hidden_states, attention_mask
        if self._prelude is not None:
            h = self._prelude(h)
        batch, seq = h.shape[:2]
        valid = key_padding(attention_mask, batch, seq, h.device)
        rows = torch.arange(batch, device=h.device)
        out = h.new_empty(h.shape)
        kind = self.plan.kind
        for i, layer in enumerate(self._steps):
            h_in = h
            h = first(layer(h, mask, *args, **kwargs))
            e = self.exit_after(i)
            if e is None:
                continue
            done = self.leaving(e, encoder_readout(kind, h_in, valid), encoder_readout(kind, h, valid))
            if not bool(done.any()):
                continue
            out[rows[done]] = self.exit_heads[e](h[done])
            self.stats.histogram[e] += int(done.sum())
            keep = ~done
            current = h.shape[0]
            h, valid, rows = h[keep], valid[keep], rows[keep]
            mask, args, kwargs = take_rows(mask, keep, current), take_rows(args, keep, current), take_rows(kwargs, keep, current)
            if rows.numel() == 0:
                break
        if rows.numel():
            out[rows] = h
            self.stats.histogram[-1] += rows.numel()
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out)

    def exit_after(self, i: int) -> int | None:
        """The exit evaluated after block i (None: none there, or its threshold never lets a row out)."""
        e = next((e for e, layer in enumerate(self.plan.exit_layers) if layer == i), None)
        return None if e is None or math.isinf(self.plan.thresholds[e]) else e

    def leaving(self, e: int, r_in: torch.Tensor, r_out: torch.Tensor) -> torch.Tensor:
        """[B] bool: the rows that leave at exit e, from the readouts entering / leaving its block (the
        token router's encoder loop asks the same question, so both loops exit alike)."""
        signal = encoder_signals(self.plan.kind, self.exit_heads[e], self._tail, r_in, r_out)[self.plan.measure]
        return signal >= self.plan.thresholds[e]


# -- causal LMs -------------------------------------------------------------------------------------

def lm_token_signals(norm: nn.Module, lm_head: nn.Linear, h_in: torch.Tensor, h_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """[N, D] states entering/leaving an exit block (h_out already through the exit's adapter) ->
    per-token signals. The LM-head confidence comes from the fused kernel (no [N, V] logits) for
    decode-sized N, where it wins; at prefill / calibration sizes one big matmul amortizes the logits
    and the kernel's plain-torch reference is faster on CPU (measured: N=32 0.05 s vs 0.08 s, N=128
    0.61 s vs 0.34 s at V=49152, D=576). Same quantities."""
    from ..kernels.exit_confidence import exit_confidence
    from ..kernels.exit_confidence.reference import torch_exit_confidence

    fn = exit_confidence if h_out.shape[0] <= FUSED_MAX_TOKENS or h_out.is_cuda else torch_exit_confidence
    max_prob, margin, top1 = fn(norm(h_out), lm_head.weight, lm_head.bias)
    return {"softmax_max": max_prob, "margin": margin, "top1": top1, "saturation": cosine01(h_out, h_in)}


def predictor_features(norm: nn.Module, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """What the learned predictor reads: the normed state leaving the block and its saturation."""
    normed = norm(h_out)
    return torch.cat([normed, cosine01(h_out, h_in).unsqueeze(-1).to(normed.dtype)], -1)


class LMExitHeads(nn.Module):
    """Per exit of a causal LM: an adapter onto the last block's state and, for the "learned" measure,
    a linear predictor of "this exit's next token is the full model's" (CALM's early-exit classifier)."""

    def __init__(self, hidden: int, exits: int, predictors: bool):
        super().__init__()
        self.adapters = nn.ModuleList(ExitAdapter(hidden) for _ in range(exits))
        self.predictors = nn.ModuleList(nn.Linear(hidden + 1, 1) for _ in range(exits)) if predictors else None

    def learned_signal(self, e: int, norm: nn.Module, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.predictors[e](predictor_features(norm, h_in, h_out)).squeeze(-1))


@dataclass
class _ExitCall:
    """What one forward call's exits did (per call, so concurrent calls do not share it)."""

    exit_index: torch.Tensor   # [B, S] the exit a token took (-1: none)
    histogram: list[int]


class LMExitPolicy(StackPolicy):
    """Early exit on the stack controller: after an exit block, the live tokens whose confidence
    reaches the threshold leave; after the last block each exited token's frozen state goes through
    its exit's adapter. Holds the plan, the exit heads (adapters, predictors; the model's final norm +
    LM head) and the statistics summed over calls."""

    name = "early_exit"

    def __init__(self, plan: ExitPlan, norm: nn.Module, lm_head: nn.Linear, heads: LMExitHeads, num_layers: int):
        self.plan, self.norm, self.lm_head, self.heads, self.num_layers = plan, norm, lm_head, heads, num_layers
        self.exit_at = {layer: e for e, layer in enumerate(plan.exit_layers)}
        self.stats = ExitStats()
        self.stats.reset(len(plan.exit_layers))

    def begin(self, tokens: torch.Size, device: torch.device) -> _ExitCall:
        return _ExitCall(torch.full(tokens, -1, dtype=torch.long, device=device), [0] * (len(self.plan.exit_layers) + 1))

    def acts_after(self, i: int) -> bool:
        e = self.exit_at.get(i)
        return e is not None and not math.isinf(self.plan.thresholds[e])

    def exit(self, state: _ExitCall, i: int, h_in: torch.Tensor, h_out: torch.Tensor, where) -> torch.Tensor:
        e = self.exit_at[i]
        leave = self.signal(e, h_in, h_out) >= self.plan.thresholds[e]
        if bool(leave.any()):
            state.exit_index[where[0][leave], where[1][leave]] = e
            state.histogram[e] += int(leave.sum())
        return leave

    def finish(self, state: _ExitCall, h: torch.Tensor, exited: torch.Tensor) -> torch.Tensor:
        state.histogram[-1] += int((~exited).sum())
        if not bool((state.exit_index >= 0).any()):
            return h
        h = h.clone()  # exited tokens' frozen states, each through its exit's adapter
        for e, adapter in enumerate(self.heads.adapters):
            took = state.exit_index == e
            if bool(took.any()):
                h[took] = adapter(h[took])
        return h

    def end(self, state: _ExitCall, call: StackCall) -> None:
        for e, n in enumerate(state.histogram):
            self.stats.histogram[e] += n
        self.stats.kv_fill_tokens += call.kv_fill_tokens
        self.stats.kv_fill_seconds += call.kv_fill_seconds

    def signal(self, e: int, h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
        """Exit e's confidence for live tokens ([N, D] states entering / leaving its block)."""
        if self.plan.measure == "learned":
            return self.heads.learned_signal(e, self.norm, h_in, h_out)
        if self.plan.measure == "saturation":  # the same quantity lm_token_signals gives, without the LM head
            return cosine01(self.heads.adapters[e](h_out), h_in)
        return lm_token_signals(self.norm, self.lm_head, h_in, self.heads.adapters[e](h_out))[self.plan.measure]


def install_lm_exits(model: nn.Module, layers: nn.ModuleList, plan: ExitPlan, norm: nn.Module, lm_head: nn.Linear,
                     heads: LMExitHeads, set_attr: Callable[[Any, str, Any], None] = setattr) -> LMExitPolicy:
    """Add the exit policy to the stack's controller, and register `heads` on `model` (as
    `adaptc_exit_heads`, so its weights are in the state_dict that adaptc.save writes). set_attr:
    ModuleEdit.set_attr, so a rollback undoes both."""
    kv = kv_projection_for(layers)
    if kv is None:
        raise AdaptcError(f"{no_kv_projection_reason(layers)}: exited tokens would leave holes in the cache")
    set_attr(model, LM_HEADS_ATTR, heads)
    policy = LMExitPolicy(plan, norm, lm_head, heads, len(layers))
    install_policy(layers, policy, kv, set_attr=set_attr)
    return policy


def lm_exits_of(model: nn.Module) -> LMExitPolicy | None:
    """The early-exit policy on a compiled causal LM's stack controller (None without one)."""
    controller = controller_of(model)
    return controller.policy(LMExitPolicy) if controller is not None else None


def encoder_runtime_of(model: nn.Module) -> EarlyExitEncoder | None:
    """The encoder's exit runtime: an EarlyExitEncoder, or the one a token router's loop runs."""
    for m in model.modules():
        found = m if isinstance(m, EarlyExitEncoder) else getattr(m, "exit_runtime", None)
        if isinstance(found, EarlyExitEncoder):
            return found
    return None


def exit_stats(model: nn.Module) -> ExitStats | None:
    """The exit statistics of a compiled model's runtime (None without one)."""
    rt = encoder_runtime_of(model) or lm_exits_of(model)
    return rt.stats if rt is not None else None
