PY := .venv/bin/python
STAMP := .venv/.installed
# The extras the README offers whose tests `make test` runs: light enough for CI (not `bench`: TRL)
EXTRAS := tensorboard,wandb
EXTRAS_STAMP := .venv/.installed-extras

.PHONY: test demo setup setup-extras lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(EXTRAS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,$(EXTRAS)]'
	touch $(EXTRAS_STAMP)

setup: $(STAMP)

setup-extras: $(EXTRAS_STAMP)

lint: $(STAMP)
	.venv/bin/ruff check .

test: $(EXTRAS_STAMP)
	.venv/bin/ruff check .
	$(PY) -m pytest

demo: $(STAMP)
	.venv/bin/forkflow demo --out runs/demo

clean:
	rm -rf .venv runs .pytest_cache
