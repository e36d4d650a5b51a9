# byol_fast: make install, make test, make pretrain. Every target works from a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

CONFIG ?= config/demo.yaml
DATA ?=
ARGS ?=
DEMO := data/demo
# GPUs to use in all; defaults to every GPU on this machine (0 on a CPU-only machine).
# GPUS_PER_NODE (default: this machine's GPUs, or 8) sets the node size for multi-node runs.
GPUS_HERE := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
GPUS ?= $(GPUS_HERE)

.PHONY: install test test-fast test-gpu pretrain demo-data index shards linear-eval finetune benchmark clean help

help:
	@echo "make install                  create $(VENV) with the pinned dependencies"
	@echo "make test                     run the test suite (CPU)"
	@echo "make test-fast                the suite without the tests marked slow (a quick lane while you work)"
	@echo "make pretrain                 pretrain on the generated demo dataset (config/demo.yaml)"
	@echo "make pretrain CONFIG=config/byol_r50_in1k_300ep.yaml DATA=/imagenet GPUS=8"
	@echo "make index DATA=/imagenet     check every image of DATA/train and DATA/val once, write the index"
	@echo "make index DATA=/imagenet LABELS=/imagenet/LOC_val_solution.csv   a flat val/ labelled by that file"
	@echo "make shards DATA=/imagenet OUT=/scratch/imagenet-shards   pack train/ and val/ into tar shards (SHARD_SIZE=1GB)"
	@echo "make linear-eval              linear evaluation of runs/demo/last.pt on the demo dataset"
	@echo "make linear-eval LINEAR_CONFIG=config/linear_r50_in1k.yaml CHECKPOINT=runs/r50/last.pt DATA=/imagenet GPUS=8"
	@echo "make finetune                 fine-tune runs/demo/last.pt with 10% of the demo's labels (config/finetune_demo.yaml)"
	@echo "make finetune FINETUNE_CONFIG=config/finetune_r50_in1k_10pct.yaml CHECKPOINT=runs/r50/last.pt DATA=/imagenet GPUS=8"
	@echo "make pretrain|linear-eval ... GPUS=16 NNODES=2 NODE_RANK=0|1 MASTER_ADDR=<node 0>   on each node (srun under SLURM)"
	@echo "make benchmark                benchmarks/throughput.py (img/s, stage by stage)"

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Test files spread over TEST_WORKERS processes (pytest-xdist), each file whole in one of them (its
# module fixtures made once); TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
TEST_ARGS = -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test: install
	$(PY) -m pytest $(TEST_ARGS)

test-fast: install
	$(PY) -m pytest $(TEST_ARGS) -m "not slow"

test-gpu: install
	$(PY) -m pytest -q -m gpu

demo-data: install
	$(PY) -m byol_fast.data demo $(DEMO)

# With no DATA and the demo config, the demo dataset is made first if it is missing (a folder made by
# another version of the generator stops here with a message, rather than training on other data).
# The launch (one process, torchrun on this node, torchrun across nodes, or srun under SLURM) is
# worked out by byol_fast.launch, for pretrain and linear-eval alike; `make -n pretrain GPUS=32 ...`
# and `make -n linear-eval GPUS=32 ...` print the exact command.
# $(call launch,ENTRY,ARGS): the command that runs byol_fast.ENTRY with ARGS on $(GPUS) GPUs; where
# byol_fast.launch cannot work it out here (--print fails), the recipe runs it and it says why.
MAX_RESTARTS ?= 0
LAUNCH_ENV = $(foreach v,NNODES NODE_RANK MASTER_ADDR MASTER_PORT GPUS_PER_NODE,$(if $($(v)),$(v)=$($(v))))
launch_args = --gpus $(GPUS) --python $(PY) --max-restarts $(MAX_RESTARTS) --entry $(1) -- $(2)
launch_print = $(shell env $(LAUNCH_ENV) $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m byol_fast.launch --print $(call launch_args,$(1),$(2)) 2>/dev/null)
launch = $(or $(call launch_print,$(1),$(2)),env $(LAUNCH_ENV) $(PY) -m byol_fast.launch $(call launch_args,$(1),$(2)))

TRAIN_ARGS = --config $(CONFIG) $(if $(DATA),--data.path=$(DATA)/train) $(ARGS)
pretrain: install
	@if [ -z "$(DATA)" ] && [ "$(CONFIG)" = "config/demo.yaml" ]; then \
		$(PY) -m byol_fast.data demo $(DEMO) || exit $$?; fi
	$(call launch,train,$(TRAIN_ARGS))

# A flat val/ (ImageNet as downloaded) finds its label file beside it; LABELS=FILE names one instead
# (for val/, or for DATA itself when it holds no splits).
LABELS ?=
index: install
	@test -n "$(DATA)" || { echo "make index DATA=/path/to/dataset (holding train/ and val/, or images)"; exit 2; }
	@for split in train val; do if [ -d "$(DATA)/$$split" ]; then \
		$(PY) -m byol_fast.data index $(DATA)/$$split $(if $(LABELS),$$([ $$split = val ] && echo --labels "$(LABELS)")) \
		|| exit $$?; fi; done; \
	if [ ! -d "$(DATA)/train" ] && [ ! -d "$(DATA)/val" ]; then \
		$(PY) -m byol_fast.data index $(DATA) $(if $(LABELS),--labels "$(LABELS)"); fi

# Tar shards (WebDataset layout, read by DALI): DATA/train and DATA/val (or DATA itself) -> OUT/...
SHARD_SIZE ?= 1GB
OUT ?=
shards: install
	@test -n "$(DATA)" -a -n "$(OUT)" || { echo "make shards DATA=/path/to/dataset OUT=/path/to/new/folder [SHARD_SIZE=1GB]"; exit 2; }
	$(PY) -m byol_fast.data shards $(DATA) $(OUT) --shard-size $(SHARD_SIZE)

# Linear evaluation: the demo's by default; the paper's protocol with LINEAR_CONFIG=config/linear_r50_in1k.yaml.
LINEAR_CONFIG ?= config/linear_demo.yaml
CHECKPOINT ?= runs/demo/last.pt
LINEAR_ARGS = --config $(LINEAR_CONFIG) --checkpoint $(CHECKPOINT) $(if $(DATA),--data $(DATA)) $(ARGS)
linear-eval: install
	$(call launch,linear_eval,$(LINEAR_ARGS))

# Semi-supervised fine-tuning: the demo's 10% by default; the paper's with FINETUNE_CONFIG=config/finetune_r50_in1k_{1,10}pct.yaml.
FINETUNE_CONFIG ?= config/finetune_demo.yaml
FINETUNE_ARGS = --config $(FINETUNE_CONFIG) --checkpoint $(CHECKPOINT) $(if $(DATA),--data $(DATA)) $(ARGS)
finetune: install
	$(call launch,finetune,$(FINETUNE_ARGS))

benchmark: install
	$(PY) benchmarks/throughput.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
