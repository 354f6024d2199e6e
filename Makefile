# Two commands on a fresh machine:  make demo   and   make test
# Each creates (or reuses) the virtual environment .venv and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PRIVTEXT := $(VENV)/bin/privtext
STAMP := $(VENV)/.privtext-installed
# The engines (Spark, Ray Data) are optional extras for users; tests and CI install them so the
# engine tests always run (Spark also needs a Java runtime: .ci/run installs one when missing).
EXTRAS ?= test,evaluate,spark,ray

.PHONY: install demo test test-fast test-engines lint bench bench-engines bench-utility clean

$(STAMP): pyproject.toml setup.py privtext/mechanisms/_amx_kernel.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the packaged default embedding: build (or reuse) the index, then anonymise the
# sample corpus with truncated Gumbel and the Laplace baseline, with epsilon reports.
demo: $(STAMP)
	$(PRIVTEXT) index
	mkdir -p demo-out
	$(PRIVTEXT) perturb examples/sample.jsonl -o demo-out/sample.gumbel.jsonl \
		--mechanism gumbel --epsilon 300 --report demo-out/report.gumbel.json
	$(PRIVTEXT) perturb examples/sample.jsonl -o demo-out/sample.laplace.jsonl \
		--mechanism laplace --epsilon 10 --report demo-out/report.laplace.json
	@echo "--- original";  cat examples/sample.jsonl
	@echo "--- gumbel";    cat demo-out/sample.gumbel.jsonl
	@echo "--- laplace";   cat demo-out/sample.laplace.jsonl

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not engine"

test-engines: $(STAMP)
	$(PY) -m pytest -q -m engine

lint: $(STAMP)
	$(VENV)/bin/ruff check privtext tests bench

bench: $(STAMP)
	$(PY) bench/throughput.py

# words/s through the CLI, Spark local and Ray local on the same corpus (see docs/engines.md)
bench-engines: $(STAMP)
	$(PY) bench/engines.py

# Every registered mechanism at matched N_w on SMS Spam, 20 Newsgroups and BBC News (~10 min on
# 2 cores); table and plots under bench/out/, see docs/evaluation.md.
bench-utility: $(STAMP)
	$(PY) bench/utility.py

clean:
	rm -rf demo-out bench/out .pytest_cache
