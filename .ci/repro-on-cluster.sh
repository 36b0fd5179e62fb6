#!/usr/bin/env bash
# A CI-triggered reproducibility run on a Kubernetes cluster (an example for a scheduled CI job;
# the test entrypoint is .ci/run). It submits the whole pipeline as one in-cluster driver Job and
# leaves it running there, polls `lopd status` until the driver finishes (or cancels the run after
# TIMEOUT_S), then fetches the eval summary and compares it with an expected file.
#
#   RECIPE=jobs/recipes/qwen3-8b.yaml EXPECTED=path/to/expected.json .ci/repro-on-cluster.sh
#
# Needs: the lopd CLI with the k8s extra, a kubeconfig for the lopd-deployer ServiceAccount
# (manifests/rbac.yaml), and S3 credentials for the recipe's store in the environment.
# Expected file: {"tolerance": 0.02, "results": {"<checkpoint>": {"math_avg": 0.61, "code_avg": 0.35}}}
# (.ci/repro-on-cluster.expected.json shows the shape).
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPE=${RECIPE:-jobs/recipes/qwen3-8b.yaml}
EXPECTED=${EXPECTED:-.ci/repro-on-cluster.expected.json}
TIMEOUT_S=${TIMEOUT_S:-345600}   # 4 days
POLL_S=${POLL_S:-300}
LOPD=${LOPD:-lopd}
SETS=()
[[ -n "${RUN_ID:-}" ]] && SETS+=(--set "run_id=${RUN_ID}")
[[ -n "${PRIORITY:-}" ]] && SETS+=(--set "kubernetes.workload_priority_class=${PRIORITY}")

driver_state() {
  "$LOPD" status --recipe "$RECIPE" "${SETS[@]}" --json |
    python3 -c 'import json, sys; rows = {r["stage"]: r for r in json.load(sys.stdin)}; print(rows.get("driver", {}).get("state", "-"))'
}

"$LOPD" pipeline --backend k8s --detach --recipe "$RECIPE" "${SETS[@]}"
deadline=$((SECONDS + TIMEOUT_S))
while true; do
  state=$(driver_state)
  echo "$(date -u +%FT%TZ) driver: $state"
  case "$state" in
    Succeeded) break ;;
    Failed | Cancelled)
      "$LOPD" status --recipe "$RECIPE" "${SETS[@]}"
      exit 1 ;;
  esac
  if ((SECONDS > deadline)); then
    echo "timed out after ${TIMEOUT_S}s: cancelling the run" >&2
    "$LOPD" cancel --recipe "$RECIPE" "${SETS[@]}"
    exit 1
  fi
  sleep "$POLL_S"
done

out=$(mktemp -d)
"$LOPD" report --recipe "$RECIPE" "${SETS[@]}" --out "$out" --no-publish
python3 - "$out/summary.json" "$EXPECTED" <<'PY'
import json
import sys

summary, expected = (json.load(open(p)) for p in sys.argv[1:3])
tol = expected.get("tolerance", 0.02)
bad = []
for ckpt, metrics in expected["results"].items():
    for key, want in metrics.items():
        got = ((summary["results"].get(ckpt) or {}).get(key) or {}).get("avg")
        if got is None or abs(got - want) > tol:
            bad.append(f"{ckpt} {key}: got {got}, expected {want} ± {tol}")
print("\n".join(bad) or f"eval summary matches {sys.argv[2]}")
sys.exit(1 if bad else 0)
PY
