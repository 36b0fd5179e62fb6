"""The embedded default's first steps: task data, the student base, and a trained teacher.

    write the synthetic task                 → <data_dir>/{sft,opd}_prompts.jsonl, arith.jsonl, …
    init the teacher and the student          → init-model (one shared tokenizer)
    publish the ground-truth chats            → runs/<run>-teacher/sft-data   (as sft-data would)
    train the teacher with the sft stage      → runs/<run>-teacher/sft        (= models.teacher.uri)

Each step is skipped when its output exists, so a killed bootstrap resumes. The teacher is
trained by the very ``jobs.sft`` entrypoint the pipeline uses for the student, from a derived
recipe written beside the data (``teacher-recipe.yaml``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import yaml

from lopd import LopdError
from lopd.data.synthetic import teacher_file, write_task
from lopd.layout import MANIFEST, stage_prefix, teacher_run, teacher_sft_prefix
from lopd.manifest import has_manifest, publish
from lopd.recipe import Recipe
from lopd.store import file_digest, open_store

TASK_MARKER = "TASK.json"


class BootstrapError(LopdError):
    pass


def teacher_run_id(recipe: Recipe) -> str:
    return teacher_run(recipe.run_id)


def write_task_once(recipe: Recipe) -> dict[str, Path]:
    """Write the task files unless ``TASK.json`` says they exist with the same parameters."""
    b = recipe.bootstrap
    out = Path(b.data_dir)
    keys = ("seed", "n_teacher", "n_sft", "n_opd", "n_eval", "n_val", "min_terms", "max_terms", "max_value")
    params = {k: getattr(b, k) for k in keys}
    marker = out / TASK_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("params") == params and teacher_file(b.teacher_style, b.teacher_draw) in done.get("files", {}):
            return {k: Path(v) for k, v in done["files"].items()}
    paths = write_task(out, seed=b.seed, n_teacher=b.n_teacher, n_sft=b.n_sft, n_opd=b.n_opd, n_eval=b.n_eval,
                       n_val=b.n_val, min_terms=b.min_terms, max_terms=b.max_terms, max_value=b.max_value)
    marker.write_text(json.dumps({"params": params, "files": {k: str(v) for k, v in paths.items()}}, indent=2))
    return paths


def init_models(recipe: Recipe, corpus: Path) -> Path:
    """Create the teacher's initial weights and the student base (sharing the tokenizer)."""
    from lopd.modelinit import init_model

    b = recipe.bootstrap
    init_teacher = Path(b.data_dir).parent / "init" / "teacher"
    student = Path(recipe.models.student.uri)
    if not (init_teacher / MANIFEST).is_file():
        _fresh(init_teacher)
        init_model(init_teacher, arch=b.teacher.arch, size=b.teacher.size, corpus=corpus, vocab_size=b.vocab_size,
                   seed=b.teacher.seed, overrides=b.teacher.overrides)
    init_student(recipe, student)
    return init_teacher


def init_student(recipe: Recipe, dest: Path, seed_offset: int = 0) -> Path:
    """The student base at ``dest``, initialised with seed ``bootstrap.student.seed + seed_offset``
    and the tokenizer of the teacher's initial weights (made first by :func:`init_models`);
    skipped when it exists."""
    from lopd.modelinit import init_model

    b = recipe.bootstrap
    if not (dest / MANIFEST).is_file():
        _fresh(dest)
        init_model(dest, arch=b.student.arch, size=b.student.size, seed=b.student.seed + seed_offset,
                   tokenizer=Path(b.data_dir).parent / "init" / "teacher", overrides=b.student.overrides)
    return dest


def _fresh(path: Path) -> None:
    """A directory left by a killed init-model (no manifest) is removed and made again."""
    import shutil

    if path.exists():
        shutil.rmtree(path)


def publish_ground_truth(recipe: Recipe, chats: Path) -> None:
    """Publish the ground-truth chats as the teacher run's sft-data (SFT_DATA schema)."""
    from lopd.data.schemas import SFT_DATA, write_table

    store = open_store(recipe.store)
    prefix = stage_prefix(teacher_run_id(recipe), "sft-data")
    if has_manifest(store, prefix):
        return
    rows = [json.loads(line) for line in chats.read_text().splitlines() if line.strip()]
    table = pa.table({
        "prompt_id": [r["prompt_id"] for r in rows],
        "messages": [r["messages"] for r in rows],
        "num_tokens": [0] * len(rows),
        "finish_reason": ["stop"] * len(rows),
    })
    out = Path(recipe.bootstrap.data_dir) / "ground-truth"
    out.mkdir(parents=True, exist_ok=True)
    write_table(table, out / "data.parquet", SFT_DATA)
    fp = "ground-truth:" + file_digest(chats)
    publish(store, prefix, out, stage="sft-data", run_id=teacher_run_id(recipe), recipe_sha256=recipe.sha256(),
            lineage={"teacher_fingerprint": fp, "source": str(chats)}, metrics={"rows": len(rows)})


def teacher_recipe(recipe: Recipe, init_teacher: Path) -> dict:
    """The derived recipe that trains the teacher with the sft stage."""
    data = recipe.model_dump(mode="json", exclude={"bootstrap"})
    data["run_id"] = teacher_run_id(recipe)
    data["models"]["student"] = {"uri": str(init_teacher)}
    data["sft"] = recipe.bootstrap.teacher_sft.model_dump(mode="json")
    return data


def bootstrap(recipe: Recipe, run_stage: Callable[[str, Path], None], echo: Callable[[str], None] = print) -> None:
    """Run every bootstrap step that has not run yet; ``run_stage(stage, recipe_file)`` runs a job."""
    b = recipe.bootstrap
    if b is None:
        return
    expected = teacher_sft_prefix(recipe.run_id)
    if Path(recipe.models.teacher.uri).resolve() != (Path(recipe.store) / expected).resolve():
        raise BootstrapError(f"models.teacher.uri: with a bootstrap section it must name the trained teacher "
                             f"{Path(recipe.store) / expected} (got {recipe.models.teacher.uri!r})")
    paths = write_task_once(recipe)
    echo(f"bootstrap: task data in {b.data_dir}")
    init_teacher = init_models(recipe, paths["corpus"])
    echo(f"bootstrap: models initialised ({init_teacher}, {recipe.models.student.uri})")
    publish_ground_truth(recipe, paths[teacher_file(b.teacher_style, b.teacher_draw)])
    store = open_store(recipe.store)
    if not has_manifest(store, stage_prefix(teacher_run_id(recipe), "sft")):
        derived = Path(b.data_dir) / "teacher-recipe.yaml"
        derived.write_text(yaml.safe_dump(teacher_recipe(recipe, init_teacher), sort_keys=False))
        run_stage("sft", derived)
    echo(f"bootstrap: teacher trained ({recipe.models.teacher.uri})")
