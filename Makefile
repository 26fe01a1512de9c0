# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lungseg-installed
DEMO_OUT ?= outputs/demo

.PHONY: venv demo test nbtest sync export clean-nbs docs bench test-min

$(STAMP): settings.ini setup.py scripts/setup_venv.sh
	bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/lungseg demo --out $(DEMO_OUT)

test: $(STAMP)
	bash scripts/setup_browser.sh
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/run_tests.sh

nbtest: $(STAMP)
	cd nbs && ../$(BIN)/nbdev_test --n_workers 1

export: $(STAMP)
	$(BIN)/nbdev_export
	$(BIN)/python scripts/readme.py

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

# The site from the notebooks into _docs/, offline (Quarto renders it where `quarto` is on PATH).
docs: $(STAMP)
	$(BIN)/python scripts/build_docs.py

# The figures the pages show: the notebooks that draw, run top to bottom (the real LIDC-IDRI sample where it is, slow cells too),
# their outputs checked (no machine paths, progress bars or large PNGs) and saved in place, then nbdev_clean (scripts/figures.py).
# Some only: `make figures NOTEBOOKS="05a_preprocessing 06_dataset"`; `FIGURES_ARGS=--skip-slow` keeps the slow cells' outputs.
.PHONY: figures
figures: $(STAMP)
	$(BIN)/python scripts/figures.py $(FIGURES_ARGS) $(NOTEBOOKS)

# The benchmark's peers (SimpleITK, ...: the `bench` extra of settings.ini) are installed first, so that every row has its peer.
BENCH_STAMP := $(VENV)/.lungseg-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/lungseg bench --quick --json outputs/bench.json

# The minimum versions: settings.ini's floors installed exactly in their own environment (scripts/min_versions.sh), then the
# tests that need no development tool (not the notebook runs, the docs build nor the nbdev sync check). A floor too low fails here.
MIN_VENV ?= .venv-min
MIN_STAMP := $(MIN_VENV)/.lungseg-min-installed
MIN_SKIP := --ignore=tests/test_notebooks.py --ignore=tests/test_docs.py --ignore=tests/test_sync.py
$(MIN_STAMP): settings.ini setup.py scripts/min_versions.sh
	bash scripts/min_versions.sh $(MIN_VENV)
	touch $(MIN_STAMP)

test-min: $(MIN_STAMP)
	PATH="$(abspath $(MIN_VENV)/bin):$$PATH" bash scripts/run_tests.sh $(MIN_SKIP)
