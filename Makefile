# Every target sets itself up: on a fresh clone `make export MODEL=tiny` and `make test`
# each work as the first command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= tiny
STAGES ?= hf,onnx,fp16,int8,trt
OUT    ?= out/$(MODEL)
ARGS   ?=

.PHONY: setup export test lint bench bench-export verify doctor clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build on disk (DESIGN.md §8): an unpinned torch would pull
# several GB of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

export: setup
	$(BIN)/exportline export $(MODEL) --out $(OUT) --stages $(STAGES) $(ARGS)

lint: setup
	$(BIN)/ruff check exporters verify bench deploy tests

verify: setup
	$(BIN)/exportline verify $(OUT) $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

bench: setup
	$(BIN)/exportline bench $(OUT) $(ARGS)

bench-export: setup
	$(BIN)/python -m exportline.bench.export_cost $(MODEL) $(ARGS)

doctor: setup
	$(BIN)/exportline doctor

clean:
	rm -rf out build *.egg-info
