"""``make demo``: the embedded default, today at the foundation stage.

Until the stage entrypoints land (sft-data → sft → precompute → opd → eval), the demo shows
what exists end to end on a CPU: it writes a small arithmetic corpus, creates the tiny
recipe's teacher and student with ``lopd init-model`` (sharing one tokenizer), publishes
both to the run's ``file://`` store with manifests written last, reads them back verified,
and prints their fingerprints and the resolved recipe's hash. Re-running reuses what exists.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from lopd import LopdError
from lopd.lineage import fingerprint, has_manifest, publish, read_manifest
from lopd.modelinit import init_model
from lopd.recipe import load_recipe
from lopd.store import open_store

RECIPE = Path(__file__).with_name("recipes") / "tiny.yaml"


def corpus(path: Path, n: int = 4000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        xs = [rng.randint(1, 99) for _ in range(rng.randint(2, 4))]
        steps, acc = [], xs[0]
        for x in xs[1:]:
            steps.append(f"{acc}+{x}={acc + x}")
            acc += x
        lines.append(f"Compute {'+'.join(map(str, xs))}. {'; '.join(steps)}. The answer is \\boxed{{{acc}}}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    recipe = load_recipe(RECIPE)
    store = open_store(recipe.store)
    text = corpus(Path(recipe.store) / "runs" / recipe.run_id / "data" / "corpus.txt")
    teacher_dir, student_dir = Path(recipe.models.teacher.uri), Path(recipe.models.student.uri)
    if not (teacher_dir / "MANIFEST.json").exists():
        init_model(teacher_dir, size="small", corpus=text, vocab_size=512, seed=1)
    if not (student_dir / "MANIFEST.json").exists():
        init_model(student_dir, size="tiny", tokenizer=teacher_dir, seed=2)
    for name, path in (("teacher", teacher_dir), ("student", student_dir)):
        prefix = f"runs/{recipe.run_id}/models/{name}"
        if not has_manifest(store, prefix):
            publish(store, prefix, path, stage=f"model-{name}", run_id=recipe.run_id,
                    recipe_sha256=recipe.sha256(), lineage={"fingerprint": fingerprint(str(path))})
        m, sha = read_manifest(store, prefix, verify=True)
        print(f"{name:8s} {store.url(prefix)}  fingerprint {m.lineage['fingerprint'][:16]}  "
              f"({len(m.files)} files, manifest {sha[:12]})")
    print(f"recipe   {RECIPE.name}  run_id={recipe.run_id}  recipe_sha256={recipe.sha256()[:12]}")
    print("stages   sft-data -> sft -> precompute -> opd -> eval: run them with `lopd run <stage> -r "
          f"{RECIPE.relative_to(Path.cwd()) if RECIPE.is_relative_to(Path.cwd()) else RECIPE}`")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LopdError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
