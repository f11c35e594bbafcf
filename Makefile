# Two entry points for a fresh machine:
#   make demo   install, then run the main job on the bundled default scenario
#   make test   install what the tests need, lint, and run the whole test suite (CI runs this)
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test bench

install:
	# torch first and pinned: the CPU build; an unpinned torch would pull CUDA packages.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'

demo: install
	$(PYTHON) -m simulator.evaluate --scenario dfaas-paise25 --policy apl --episodes 100 --seed 0
	$(PYTHON) -m simulator.evaluate --scenario dfaas-paise25 --policy fill-local-then-forward --episodes 100 --seed 0
	$(PYTHON) -m simulator.evaluate --scenario dfaas-paise25 --policy global-node --episodes 100 --seed 0

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m simulator.bench --scenario dfaas-paise25 --envs 4096 --json
