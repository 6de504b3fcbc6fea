# Quick start: `make demo` (the whole pipeline on a generated dataset) and `make test` (the suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# Every command below, and all it launches, runs as in the activated venv (as the sbatch scripts do): torch
# JIT-builds DeepSpeed's CPU op with whichever `ninja` comes first on PATH, and a system ninja of another
# version than the venv's reads the other's build log as stale and compiles the op again (~60 s) each time.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test test-fast docs

install: $(VENV)/.installed

# torch first: on x86-64 Linux this is a CUDA build that also runs on the CPU; bring your own CUDA build
# elsewhere (pip install torch) before `make`.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"  # test: pytest, and the tensorboard and demo extras
	@# On a CPU-only machine DeepSpeed compiles its shm all-reduce in the first run's first update (~60 s on
	@# 2 cores); compile it now, into torch's extension cache. Nothing to do with a GPU.
	$(PY) -c "from pretrain.training.deepspeed_backend import prebuild_cpu_ops as p; print('DeepSpeed CPU op:', p() or 'none needed')"
	touch $@

demo: install
	$(PY) launch/demo.py

# The whole suite (what CI runs): tests/test_slurm.py needs Slurm (.ci/slurm_up.sh starts a one-node cluster on
# localhost and the two-node one of .ci/slurm_2node.sh, in network namespaces), the mount tests root, and
# tests/test_jpeg.py the libjpeg-turbo headers (.ci/system_deps.sh). SWIN_TESTS_STRICT=1: a test whose
# infrastructure is missing fails, and any skip fails the run.
test: install
	bash .ci/system_deps.sh
	bash .ci/slurm_up.sh
	SWIN_TESTS_STRICT=1 $(PY) -m pytest -q

# The edit loop: every test that launches nothing and needs no root, Slurm or demo (the markers in
# pyproject.toml), in about a quarter of `make test`'s time; missing infrastructure skips, naming it.
FAST := not (dist or launcher or slurm or root or demo or slow)
test-fast: install
	$(PY) -m pytest -q -m "$(FAST)"

docs: install
	$(PY) -m finetune.config > docs/config.md
