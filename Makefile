# Entry points (see README): `make demo`, `make test` (the unit tier, minutes), `make test-all` (every test: CI),
# `make lint`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: this pin takes the local CPU wheel. On a GPU machine keep your CUDA torch:
#   make demo TORCH_SPEC="torch>=2.4"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-integration test-all lint install system-data

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[train,test]"
	touch $(STAMP)

# Real offline data from Debian (Fashion-MNIST, WordNet glosses, Noto Color Emoji); the build falls back without them.
SYSTEM_DATA_PACKAGES = dataset-fashion-mnist wordnet-base fonts-noto-color-emoji
system-data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -d /usr/share/wordnet ] || \
	    [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q $(SYSTEM_DATA_PACKAGES) >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(SYSTEM_DATA_PACKAGES) >/dev/null 2>&1)) \
	    || echo "note: Debian data packages unavailable; using the fallback sources"; \
	  else echo "note: not root or no apt-get; using the fallback sources"; fi; fi

demo: $(STAMP) system-data
	bash launch/demo.sh

# The tiers (tests/tiers.py): `unit` starts no process and trains for seconds at most; `integration` starts
# launchers, CLIs and workers, or trains for minutes. Unit tests run on TEST_WORKERS pytest-xdist processes,
# each test file on one of them (its module fixtures are built once); integration tests run one at a time,
# as each already starts 2-4 processes.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs

test: $(STAMP) system-data
	$(PYTEST) -m unit -n $(TEST_WORKERS) --dist loadfile

test-integration: $(STAMP) system-data
	$(PYTEST) -m integration

test-all: test test-integration

lint: $(STAMP)
	$(PY) -m ruff check .
