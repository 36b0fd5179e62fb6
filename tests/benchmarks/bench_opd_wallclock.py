"""Lightning (offline) OPD vs standard online OPD: wall-clock of the same number of updates on
the same machine, measured side by side in one run; prints ONE JSON line (medians).

Both start from the tiny recipe's SFT student with the same batch size and step count; the
offline run trains on the precomputed rollouts, the online run samples fresh rollouts from
the current student and scores them with the live teacher every step (in-process). Each is
the real ``jobs.opd`` stage process (startup included), run alternately ``--repeats`` times
with ``--force``. The pipeline prefix (bootstrap, sft-data, sft, precompute) runs first
unless it is already published (e.g. after ``make demo``), in the directory given (the repo
root by default, where the tiny recipe's ./runs live).

    python tests/benchmarks/bench_opd_wallclock.py [--steps 25] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=str(REPO))
    a = ap.parse_args()
    os.chdir(a.workdir)
    from rich.console import Console

    from lopd.recipe import load_recipe
    from lopd.repro import Study
    from lopd.runner import run_bootstrap, run_stages

    recipe_file = str(REPO / "jobs" / "recipes" / "tiny.yaml")
    recipe = load_recipe(recipe_file)
    console = Console(stderr=True, quiet=True)
    run_bootstrap(recipe, 1, console)
    run_stages(recipe, recipe_file, ["sft-data", "sft", "precompute"], (), 1, console)
    study = Study(load_recipe(recipe_file, [f"opd.train.steps={a.steps}", f"opd.train.checkpoint_every={a.steps}",
                                            "repro.selection=null"]),
                  console)
    files = {mode: study.variant(name, 0)[1] for mode, name in (("offline", "lightning"), ("online", "online"))}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times: dict[str, list[float]] = {"offline": [], "online": []}
    for _ in range(a.repeats):
        for mode, f in files.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "jobs.opd", "--recipe", str(f), "--force"], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(json.dumps({"bench": "opd_wallclock", "steps": a.steps, "global_batch": recipe.opd.train.global_batch,
                      "repeats": a.repeats, "offline_s": round(med["offline"], 2), "online_s": round(med["online"], 2),
                      "online_over_offline": round(med["online"] / med["offline"], 2),
                      "samples_s": {m: [round(x, 2) for x in v] for m, v in times.items()}}))


if __name__ == "__main__":
    main()
