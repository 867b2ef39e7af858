# The two set-up commands of the README: `make demo` and `make test` each install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install demo test bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"

DEMO := bentsao-demo
MEDZOO := $(PYTHON) -m medzoo

# the embedded default: BenTsao's LoRA on a tiny model built locally from the bundled sample (cpu-demo),
# then one question to the trained adapter. Re-running replaces the previous demo run.
demo: install
	$(MEDZOO) list
	$(MEDZOO) info bentsao
	-@$(MEDZOO) rm $(DEMO) >/dev/null 2>&1; rm -rf runs/$(DEMO)
	$(MEDZOO) train bentsao --profile cpu-demo --output-dir runs/$(DEMO) --name $(DEMO)
	$(MEDZOO) chat $(DEMO) -p "偏头痛有哪些常见症状？"

test: install
	PYTHON=$(PYTHON) bash tools/install-test-deps.sh
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) bench/list_speed.py
