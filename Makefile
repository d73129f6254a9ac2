PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: test demo setup lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	.venv/bin/ruff check .

test: $(STAMP)
	.venv/bin/ruff check .
	$(PY) -m pytest

demo: $(STAMP)
	.venv/bin/forkflow demo --out runs/demo

clean:
	rm -rf .venv runs .pytest_cache
