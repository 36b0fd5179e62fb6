#!/usr/bin/env bash
# The GPU check: lopd's training and teacher-scoring paths on one H100/H200, in at most 8 minutes,
# with nothing from a package registry. `make gpu-check` runs it; results go to $OUT (default
# gpu-check-out/) as JSON lines, copied by hand into docs/gpu/ and summarised in docs/gpu.md.
#
# On the GPU machine the image provides python3 with torch, transformers, numpy, pyarrow, PyYAML;
# what it lacks (DeepSpeed, pydantic, hjson: pure Python, plus pydantic-core built for its Python)
# travels in .gpu-deps/, which `make gpu-deps` fills on the dev box. Each step runs in its own
# process under its own time limit, so one failure (say, out of memory) leaves the others' lines.
# The steps run in order of importance and share one deadline (GPU_CHECK_SECONDS, default 480 on
# the GPU, 900 for the smoke run): a step that would start with under 20 s left writes a
# "skipped" line instead.
#
#   make gpu-deps                         # dev box (network to the package index)
#   make gpu-check                        # GPU machine, from the repository root
#   GPU_CHECK_SMOKE=1 make gpu-check      # anywhere: tiny shapes on CPU, checks the script itself
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ] && [ -x .venv/bin/python ]; then
  PY=${PYTHON:-.venv/bin/python}  # the dev box's venv has everything (.gpu-deps is built for the GPU's Python)
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  PY=${PYTHON:-python3}
  export PYTHONPATH="$PWD/.gpu-deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
stamp=$(date -u +%Y-%m-%d)
log="$OUT/gpu-check.log"

if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
  shape=tiny; batch=8; median=64; maxlen=128; mbt=512; steps=1; score_tokens=4096; limit=300; store_gib=0.05; budget=900
else
  shape=qwen3-1.7b; batch=64; median=1024; maxlen=4096; mbt=16384; steps=3; score_tokens=65536; limit=150; store_gib=1; budget=480
fi

deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-$budget} ))
run() {  # name, seconds, command...: one JSON line appended to $OUT/<name>.jsonl, output to the log
  local name=$1 secs=$2; shift 2
  local left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "{\"bench\": \"$name\", \"error\": \"skipped: the check's deadline\"}" >"$OUT/$name.jsonl"
    echo "== $name skipped (${left}s left)" | tee -a "$log"; return
  fi
  [ "$secs" -le "$left" ] || secs=$left
  echo "== $name (limit ${secs}s)" | tee -a "$log"
  timeout "$secs" "$@" >"$OUT/$name.jsonl" 2>>"$log"
  local rc=$?
  [ $rc -eq 0 ] || echo "{\"bench\": \"$name\", \"error\": \"exit $rc\"}" >>"$OUT/$name.jsonl"
  tail -c 2000 "$OUT/$name.jsonl"
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$PY" -c "import sys, torch, transformers, deepspeed, pydantic; print(sys.version.split()[0], torch.__version__, \
transformers.__version__, deepspeed.__version__, pydantic.__version__)"; } 2>&1 | tee -a "$log"

# training (kind "train", MFU per variant), most important first: the baseline (sdpa attention,
# full checkpointing) with the bf16 parity and OPD identity checks; every switch together (flat
# varlen packing, selective checkpointing); teacher scoring with the torch scorer (kind "score");
# compiled layers (inductor, with varlen and full checkpointing: compile refuses selective); varlen
# alone. Gradients add up in fp32 (train.grad_accum_fp32, the default) throughout.
common=(--shape "$shape" --batch "$batch" --median-len "$median" --max-len "$maxlen" --micro-batch-tokens "$mbt"
        --steps "$steps" --date "$stamp")
train=("$PY" tests/benchmarks/bench_gpu_step.py "${common[@]}")
run gpu-train "$limit" "${train[@]}" --only parity,sft,opd
run gpu-train-all "$limit" "${train[@]}" --only sft,opd --attn varlen --grad-ckpt selective
run gpu-score 90 "$PY" tests/benchmarks/bench_gpu_step.py --shape "$shape" --only score \
  --score-tokens "$score_tokens" --median-len "$median" --max-len "$maxlen" --date "$stamp"
run gpu-train-compile "$limit" "${train[@]}" --only sft,opd --attn varlen --compile inductor
run gpu-train-varlen "$limit" "${train[@]}" --only sft,opd --attn varlen
# host syncs and operator launches per micro-batch (the CPU census, here on the GPU's own path)
run gpu-census 60 "$PY" tests/benchmarks/bench_census.py --zero 2
# read-time verification on a machine with cores to spare and a disk of its own (file store only:
# no S3 server travels here): each verified read against the unverified one, with a control line
run store-verify 45 "$PY" tests/benchmarks/bench_store.py --stores file --gib "$store_gib" --repeats 3
echo "results in $OUT/" | tee -a "$log"
