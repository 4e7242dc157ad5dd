# Every target sets itself up: on a fresh clone `make export MODEL=tiny` and `make test`
# each work as the first command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  ?= tiny
STAGES ?= hf,onnx,fp16,int8,trt
OUT    ?= out/$(MODEL)
ARGS   ?=

.PHONY: setup lock export test lint bench bench-export bench-peers verify doctor clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build on disk (DESIGN.md §8): an unpinned torch would pull
# several GB of CUDA wheels. constraints.txt pins every other package to the versions the
# tests last passed with, so a set-up next month installs the same thing (refresh: make lock).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Re-resolve the newest versions pyproject.toml allows in a scratch venv and write them to
# constraints.txt; then run `make test` and commit constraints.txt if it passes. The local
# version label (+cpu) is dropped so the same file serves a CUDA build of torch.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[dev]'
	{ echo "# pip constraints: the versions \`make test\` passed with. Regenerate with \`make lock\`; used by \`make setup\` and CI."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i -E '^(exportline|pip|setuptools|wheel)[=@ ]' | sed -E 's/\+[a-z0-9.]+$$//'; \
	} > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(LOCK_VENV)
	@echo "wrote constraints.txt; run make test before committing it"

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

# The peers' venvs (optimum-cli's transformers 4.x, the genai builder's) install once into
# ~/.cache/exportline-tests, shared with the consumer tests; MODEL = a preset or an HF folder.
bench-peers: setup
	$(BIN)/python tests/consumer_envs.py peers
	$(BIN)/python -m exportline.bench.peers $(MODEL) $(ARGS)

doctor: setup
	$(BIN)/exportline doctor

clean:
	rm -rf out build *.egg-info
