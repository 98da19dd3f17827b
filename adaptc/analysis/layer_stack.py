"""A model's block stack, found once: embeddings -> blocks (an nn.ModuleList) -> final norm -> head.

    stack = find_layer_stack(model)   # None: no stack adaptc knows
    stack.kind                         # classifier | embedding | causal_lm
    stack.layers, stack.decoder        # the blocks; True: causal decoder layers (they cache K/V)
    stack.hidden                       # the residual stream's width
    stack.looped                       # True: `layers` are the steps of a loop over shared blocks (ALBERT)

Every adaptive pass (early exit, token routers, recursion) decides per token between these blocks, so
they share one discovery instead of each walking the model its own way. Structure is read from the
Hugging Face layout (base model, encoder.layer / layers / h, the output embeddings): that is where
the blocks are named. ALBERT's encoder applies one layer group `num_hidden_layers` times: its stack is
those applications, in order (`layers` holds the shared group once per step, `looped`), after the
encoder's own input projection (`prelude`); an adaptive pass then decides between steps of the loop
exactly as between distinct blocks (halting = early exit on a looped stack). The ONNX passes find their layers from the graph (passes/onnx/early_exit.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

KINDS = ("classifier", "embedding", "causal_lm")
DECODER_LAYER_NAMES = ("layers", "h")
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


class ClassifierTail(nn.Module):
    """The model's own pooler + classifier applied to one [CLS] vector per row."""

    def __init__(self, pooler: nn.Module | None, classifier: nn.Module, activation: nn.Module | None = None):
        super().__init__()
        self.pooler, self.classifier = pooler, classifier
        self.activation = activation  # ALBERT: a plain Linear pooler, then its own tanh module

    def forward(self, cls):
        if self.activation is not None:
            return self.classifier(self.activation(self.pooler(cls)))
        pooled = self.pooler(cls.unsqueeze(1)) if self.pooler is not None else cls
        return self.classifier(pooled)


@dataclass
class LayerStack:
    kind: str                          # classifier | embedding | causal_lm
    stack_path: str                    # where a pass edits: encoders the encoder module, LMs the ModuleList
    layers_path: str                   # the ModuleList of blocks (ALBERT: of its shared layer groups)
    layers: nn.ModuleList              # one entry per step (ALBERT: the shared group, repeated)
    decoder: bool                      # causal decoder layers (K/V cached between calls) vs encoder layers
    hidden: int                        # the residual stream's width
    embeddings: nn.Module | None = None
    tail: nn.Module | None = None      # classifier: pooler + classifier
    norm: nn.Module | None = None      # LMs: the final norm
    lm_head: nn.Linear | None = None   # LMs: the output embeddings
    prelude: nn.Module | None = None   # run on the stack's input before the first block (ALBERT's projection)
    looped: bool = False               # the steps reuse shared blocks: `layers` repeats them


def find_layer_stack(model: nn.Module) -> LayerStack | None:
    names = {id(m): n for n, m in model.named_modules()}
    base = getattr(model, "base_model", None)
    encoder = getattr(base, "encoder", None)
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList) and not getattr(base.config, "is_decoder", False):
        layers = encoder.layer
        common = dict(stack_path=names[id(encoder)], layers_path=names[id(layers)], layers=layers, decoder=False,
                      hidden=_width(base), embeddings=getattr(base, "embeddings", None))
        if base is model:
            return LayerStack("embedding", **common)
        classifier = getattr(model, "classifier", None)
        if isinstance(classifier, nn.Linear) and getattr(base, "pooler", None) is not None:
            return LayerStack("classifier", **common, tail=ClassifierTail(base.pooler, classifier))
        return None
    groups = getattr(encoder, "albert_layer_groups", None)
    if isinstance(groups, nn.ModuleList) and len(groups) and isinstance(getattr(base.config, "num_hidden_layers", None), int):
        steps = base.config.num_hidden_layers  # AlbertTransformer's own group schedule
        layers = nn.ModuleList([groups[int(i / (steps / len(groups)))] for i in range(steps)])
        common = dict(stack_path=names[id(encoder)], layers_path=names[id(groups)], layers=layers, decoder=False,
                      hidden=_width(base), embeddings=getattr(base, "embeddings", None),
                      prelude=getattr(encoder, "embedding_hidden_mapping_in", None), looped=True)
        if base is model:
            return LayerStack("embedding", **common)
        classifier, pooler = getattr(model, "classifier", None), getattr(base, "pooler", None)
        if isinstance(classifier, nn.Linear) and isinstance(pooler, nn.Linear):
            return LayerStack("classifier", **common, tail=ClassifierTail(pooler, classifier, base.pooler_activation))
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and base is not None and base is not model:
        layers = next((getattr(base, a) for a in DECODER_LAYER_NAMES if isinstance(getattr(base, a, None), nn.ModuleList)), None)
        norm = next((getattr(base, a) for a in FINAL_NORM_NAMES if getattr(base, a, None) is not None), None)
        if layers is not None and norm is not None:
            path = names[id(layers)]
            embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
            return LayerStack("causal_lm", path, path, layers, decoder=True, hidden=head.in_features,
                              embeddings=embeddings, norm=norm, lm_head=head)
    return None


def _width(base: nn.Module) -> int:
    """The residual stream's width: the config says it; else the word embeddings' width."""
    config = getattr(base, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if width is None and hasattr(base, "get_input_embeddings"):
        width = base.get_input_embeddings().embedding_dim
    return int(width)
