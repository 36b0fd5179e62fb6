"""Lightning rounds' overhead: wall-clock of precompute + opd with ``opd.rounds`` R against one
round, measured side by side in one run; prints one JSON line per R.

Every R samples and scores the same prompts once and makes the same updates; what R adds is
R-1 more start-ups of each stage (interpreter, model loads, vLLM engines, DeepSpeed). Each run
is the real stage processes through the local runner (``lopd.runner.run_stages``), timed per
process, from the tiny recipe's SFT student (the pipeline prefix runs first unless published, in
``--workdir``, a temporary directory by default). ``--ci-size`` uses the test suite's small
sizes (48 prompts, 8 updates) instead of the tiny recipe's (4,096 prompts, 80 updates).

    python tests/benchmarks/bench_rounds.py [--rounds 1,2,4] [--repeats 1] [--ci-size] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

CI_SIZE = ["bootstrap.n_teacher=256", "bootstrap.n_sft=64", "bootstrap.n_opd=48", "bootstrap.n_eval=24",
           "bootstrap.teacher_sft.train.steps=16", "sft.train.steps=12", "precompute.part_size=16",
           "opd.train.steps=8", "opd.train.global_batch=16", "opd.train.checkpoint_every=100"]


def timed_stages(recipe, recipe_file: Path, console) -> dict[str, float]:
    """Run the precompute and opd instances of ``recipe`` in order; wall seconds per instance."""
    from lopd.runner import run_stages
    from lopd.stages import split, stages_of

    out = {}
    for s in stages_of(recipe):
        if split(s)[0] in ("precompute", "opd"):
            t0 = time.monotonic()
            run_stages(recipe, recipe_file, [s], (), 1, console)
            out[s] = time.monotonic() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ci-size", action="store_true")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-rounds-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    from rich.console import Console

    from lopd.layout import run_prefix, stage_prefix
    from lopd.manifest import read_manifest
    from lopd.recipe import load_recipe, validate_recipe
    from lopd.runner import run_bootstrap
    from lopd.runner import run_stages as run
    from lopd.store import open_store

    recipe_file = REPO / "jobs" / "recipes" / "tiny.yaml"
    sets = CI_SIZE if a.ci_size else []
    base = load_recipe(str(recipe_file), sets)
    console = Console(stderr=True, quiet=True)
    run_bootstrap(base, 1, console)
    run(base, recipe_file, ["sft-data", "sft"], tuple(sets), 1, console)
    store = open_store(base.store)
    sft = store.url(stage_prefix(base.run_id, "sft"))
    data = base.model_dump(mode="json", exclude={"bootstrap", "repro", "sft_data"})
    results: dict[int, list[dict[str, float]]] = {}
    for _ in range(a.repeats):
        for r in [int(x) for x in a.rounds.split(",")]:
            rid = f"bench-rounds-{r}"
            shutil.rmtree(Path(base.store) / run_prefix(rid), ignore_errors=True)
            d = {**data, "run_id": rid, "precompute": {**data["precompute"], "student": sft},
                 "opd": {**data["opd"], "rounds": r}}
            recipe = validate_recipe(d, f"bench recipe {rid}")
            f = work / f"{rid}.yaml"
            f.write_text(yaml.safe_dump(d, sort_keys=False))
            times = timed_stages(recipe, f, console)
            pre = [read_manifest(store, stage_prefix(rid, s))[0].metrics for s in times if s.startswith("precompute")]
            results.setdefault(r, []).append({
                "precompute_s": sum(v for s, v in times.items() if s.startswith("precompute")),
                "opd_s": sum(v for s, v in times.items() if s.startswith("opd")),
                "prompts": sum(m.get("prompts", 0) for m in pre),
                "response_tokens": sum(m.get("response_tokens", 0) for m in pre)})
    one = min(x["precompute_s"] + x["opd_s"] for x in results[min(results)])
    for r, runs in results.items():
        best = min(runs, key=lambda x: x["precompute_s"] + x["opd_s"])
        total = best["precompute_s"] + best["opd_s"]
        print(json.dumps({"bench": "rounds", "rounds": r, "size": "ci" if a.ci_size else "tiny",
                          "stage_processes": 2 * r, "precompute_s": round(best["precompute_s"], 1),
                          "opd_s": round(best["opd_s"], 1), "total_s": round(total, 1),
                          "ratio_vs_fewest_rounds": round(total / one, 3), "prompts": best["prompts"],
                          "response_tokens": best["response_tokens"], "repeats": a.repeats}), flush=True)


if __name__ == "__main__":
    main()
