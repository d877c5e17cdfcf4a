# Two entry points (see README): `make demo` and `make test`. Each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines: this pin takes the local CPU wheel. On a GPU machine keep your CUDA torch:
#   make demo TORCH_SPEC="torch>=2.4"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install system-data

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

test: $(STAMP) system-data
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -rs
