"""ONNX files adaptc did not write: Hugging Face models built from configs, exported by both torch exporters.

    path = export_hf("bert", "dynamo", tmp_dir)          # or "torchscript"; "gpt2", "llama", "mixtral"

Weights are random (seeded) so nothing is downloaded; `size="tiny"` keeps tests fast, `size="base"` gives
BERT-base-like widths for the benchmark. The wrapper returns one tensor (hidden states or logits) and
disables the KV cache, the way an ONNX encoder/scorer is usually exported.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

ARCHS = ("bert", "albert", "gpt2", "llama", "mixtral")
EXPORTERS = ("dynamo", "torchscript")


def hf_config(arch: str, size: str = "tiny"):
    import transformers as tf

    width, layers, heads, kv_heads = {"tiny": (64, 2, 4, 2), "base": (768, 4, 12, 4)}[size]
    ffn = 4 * width
    if arch == "bert":
        return tf.BertConfig(vocab_size=128, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=ffn, max_position_embeddings=1024, attn_implementation="sdpa")
    if arch == "albert":  # one layer group applied num_hidden_layers times: the weight-shared case
        return tf.AlbertConfig(vocab_size=128, embedding_size=width // 2, hidden_size=width, num_hidden_layers=2 * layers,
                               num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=1024,
                               attn_implementation="sdpa")
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=width, n_layer=layers, n_head=heads, n_positions=1024,
                             attn_implementation="sdpa")
    common = dict(vocab_size=128, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=1024, attn_implementation="sdpa")
    if arch == "llama":
        return tf.LlamaConfig(intermediate_size=ffn, **common)
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=ffn // 2, num_local_experts=4, num_experts_per_tok=2,
                                experts_implementation="batched_mm", **common)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHS}")


class OneOutput(torch.nn.Module):
    """input_ids, attention_mask -> one tensor (no KV cache, no dict): what an ONNX consumer feeds and reads."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False) \
            if self.model.config.model_type not in ("bert", "albert") else self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def hf_model(arch: str, size: str = "tiny", seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    config = hf_config(arch, size)
    encoders = {"bert": tf.BertModel, "albert": tf.AlbertModel}
    model = (encoders[arch](config) if arch in encoders else tf.AutoModelForCausalLM.from_config(config)).eval()
    for name, p in model.named_parameters():  # HF zero-initialises some routers: give them real logits
        if "gate" in name and p.ndim == 2:
            torch.nn.init.normal_(p, std=0.5)
    return OneOutput(model).eval()


def export_hf(arch: str, exporter: str, out_dir: Path, size: str = "tiny", opset: int | None = None) -> Path:
    """Export once to `out_dir/<arch>-<exporter>-<size>.onnx` (reused if already there)."""
    path = Path(out_dir) / f"{arch}-{exporter}-{size}.onnx"
    return path if path.exists() else export_model(hf_model(arch, size), exporter, path, opset)


def export_model(model: torch.nn.Module, exporter: str, path: Path, opset: int | None = None) -> Path:
    """Export `OneOutput(hf_model)` (or any module taking input_ids, attention_mask) to `path`."""
    model = model if isinstance(model, OneOutput) else OneOutput(model).eval()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # padding, so the exported mask path is the general one
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=1024)
            program = torch.onnx.export(model, (ids, mask), dynamo=True, opset_version=opset or 18,
                                        input_names=["input_ids", "attention_mask"], output_names=["output"],
                                        dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False)
            program.save(str(path), external_data=False)
        elif exporter == "torchscript":
            torch.onnx.export(model, (ids, mask), str(path), dynamo=False, opset_version=opset or 17,
                              input_names=["input_ids", "attention_mask"], output_names=["output"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                            "output": {0: "batch", 1: "seq"} if model(ids, mask).dim() == 3 else {0: "batch"}})
        else:
            raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")
    return path
