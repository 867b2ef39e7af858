# The two set-up commands of the README: `make demo` and `make test` each install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"

demo: install
	medzoo list
	medzoo info bentsao

test: install
	PYTHON=$(PYTHON) bash tools/install-test-deps.sh
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) bench/list_speed.py
