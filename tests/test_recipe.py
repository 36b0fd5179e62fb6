"""Recipe schema: defaults, overrides, and one-line errors that name the key path."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time

import pytest
import yaml

from lopd.recipe import Recipe, RecipeError, apply_set, load_recipe, load_recipe_data, parse_set, validate_recipe
from tests.helpers.cli import REPO, lopd_cli

TINY = REPO / "jobs" / "recipes" / "tiny.yaml"


def base() -> dict:
    return {
        "run_id": "r1",
        "store": "s3://bucket/prefix",
        "models": {"teacher": {"uri": "Qwen/Qwen3-8B"}, "student": {"uri": "Qwen/Qwen3-4B-Base"}},
        "sft_data": {"prompts": "s3://bucket/prompts/sft.jsonl"},
        "precompute": {"prompts": "s3://bucket/prompts/opd.jsonl"},
    }


def test_defaults_are_the_papers():
    r = validate_recipe(base())
    assert r.opd.optim.lr == 2e-6 and r.opd.optim.schedule == "constant"
    assert r.opd.optim.betas == (0.9, 0.98) and r.opd.optim.weight_decay == 0.1
    assert r.opd.train.global_batch == 256 and r.opd.train.steps == 150
    assert r.opd.clip_low == r.opd.clip_high == 0.2 and r.opd.optim.grad_clip == 1.0
    assert r.opd.importance_weights.enabled is False and r.opd.kl_coef == 0.0
    assert r.precompute.sampling.max_tokens == 4096 and r.precompute.sampling.n == 1
    assert r.sft.optim.lr == 8e-5 and r.sft.optim.schedule == "cosine" and r.sft.optim.warmup_ratio == 0.1
    assert r.sft.train.steps == 3000 and r.sft.packing
    assert (r.sft_data.sampling.temperature, r.sft_data.sampling.top_p) == (0.7, 0.9)
    assert r.allow_inconsistent_teacher is False


def test_every_field_is_documented():
    from pydantic import BaseModel

    def walk(model: type[BaseModel], path: str):
        for name, field in model.model_fields.items():
            assert field.description, f"{path}{name} has no docstring"
            ann = field.annotation
            for sub in getattr(ann, "__args__", (ann,)):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub, f"{path}{name}.")

    walk(Recipe, "")


def test_tiny_recipe_loads_and_hash_is_stable():
    a = load_recipe(TINY)
    b = load_recipe(TINY)
    assert a.sha256() == b.sha256()
    c = load_recipe(TINY, ["opd.train.steps=7"])
    assert c.opd.train.steps == 7 and c.sha256() != a.sha256()


@pytest.mark.parametrize(
    "expr, path, value",
    [
        ("a.b.c=1", ["a", "b", "c"], 1),
        ("a=true", ["a"], True),
        ("x.y=1e-5", ["x", "y"], 1e-5),
        ("x=null", ["x"], None),
        ("x=hello world", ["x"], "hello world"),
        ("l[2].k=v", ["l", 2, "k"], "v"),
        ("l={a,b,3}", ["l"], ["a", "b", 3]),
        ("s=s3://b/p", ["s"], "s3://b/p"),
    ],
)
def test_parse_set(expr, path, value):
    assert parse_set(expr) == (path, value)


def test_apply_set_nested_and_lists():
    d = {"opd": {"optim": {"lr": 1}}, "eval": {"benchmarks": ["a", "b"]}}
    apply_set(d, "opd.optim.lr=3e-6")
    apply_set(d, "eval.benchmarks[1]=c")
    apply_set(d, "new.key=1")
    assert d == {"opd": {"optim": {"lr": 3e-6}}, "eval": {"benchmarks": ["a", "c"]}, "new": {"key": 1}}
    apply_set(d, "opd.optim.lr.x=1")  # Helm semantics: the scalar becomes a mapping...
    assert d["opd"]["optim"]["lr"] == {"x": 1}
    with pytest.raises(RecipeError, match=r"opd.optim.lr: Input should be a valid number"):
        validate_recipe({**base(), "opd": d["opd"]})  # ...and validation names the key
    with pytest.raises(RecipeError, match="expected key.path=value"):
        apply_set(d, "novalue")


def _mut(fn):
    d = copy.deepcopy(base())
    fn(d)
    return d


def _set(path: str, value):
    def fn(d):
        node = d
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    return fn


def _del(path: str):
    def fn(d):
        node = d
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]

    return fn


BAD = [
    ("unknown top-level key", _set("bogus", 1), "bogus: unknown key"),
    ("unknown nested key", _set("opd.optim.learning_rate", 1e-6), "opd.optim.learning_rate: unknown key"),
    ("wrong type", _set("opd.train.steps", "many"), "opd.train.steps: Input should be a valid integer"),
    ("negative batch", _set("opd.train.global_batch", -4), "opd.train.global_batch: Input should be greater than 0"),
    ("zero lr", _set("sft.optim.lr", 0), "sft.optim.lr: Input should be greater than 0"),
    ("missing teacher", _del("models.teacher"), "models.teacher: required key is missing"),
    ("missing models", _del("models"), "models: required key is missing"),
    ("missing run id", _del("run_id"), "run_id: required key is missing"),
    ("bad run id", _set("run_id", "My_Run"), "run_id: Value error, 'My_Run' is not a valid run id"),
    ("bad store scheme", _set("store", "gs://bucket/x"), "store: Value error, unsupported scheme 'gs'"),
    ("bad bucket", _set("store", "s3://UPPER/x"), "store: Value error, bad S3 bucket name"),
    ("relative file uri", _set("store", "file://rel/path"), "store: Value error, file URI must be absolute"),
    ("empty model uri", _set("models.student.uri", ""), "models.student.uri: String should have at least 1"),
    ("top_p > 1", _set("precompute.sampling.top_p", 1.5), "precompute.sampling.top_p: Input should be less than"),
    ("bad zero stage", _set("sft.train.zero_stage", 4), "sft.train.zero_stage: Input should be 0, 1, 2 or 3"),
    ("bad checkpointing", _set("sft.train.gradient_checkpointing", "some"),
     "sft.train.gradient_checkpointing: Input should be True, False or 'selective'"),
    ("compile at ZeRO-3", lambda d: (_set("opd.train.zero_stage", 3)(d), _set("opd.train.compile", True)(d)),
     "opd.train: Value error, compile: not supported with zero_stage 3"),
    ("compile with selective checkpointing",
     lambda d: (_set("sft.train.gradient_checkpointing", "selective")(d), _set("sft.train.compile", "inductor")(d)),
     "sft.train: Value error, compile: not supported with gradient_checkpointing: selective"),
    ("bad mode", _set("opd.mode", "hybrid"), "opd.mode: Input should be 'offline' or 'online'"),
    ("bad backend", _set("eval.inference.backend", "tgi"),
     "eval.inference.backend: Input should be 'vllm', 'hf' or 'torch'"),
    ("k zero", _set("eval.k", 0), "eval.k: Input should be greater than or equal to 1"),
    ("betas out of range", _set("opd.optim.betas", [0.9, 1.5]), "opd.optim.betas: Value error, each beta"),
    ("bad dtype", _set("models.teacher.dtype", "int4"), "models.teacher.dtype: Input should be"),
    ("list index path", _set("eval.benchmarks", ["a", 3]), "eval.benchmarks[1]: Input should be a valid string"),
    ("clip too big", _set("opd.clip_low", 1.0), "opd.clip_low must be < 1"),
]


@pytest.mark.parametrize("name, mutate, expected", BAD, ids=[b[0] for b in BAD])
def test_malformed_recipe_one_line_error(name, mutate, expected, tmp_path):
    data = _mut(mutate)
    with pytest.raises(RecipeError) as exc:
        validate_recipe(data)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith("recipe error: ")
    assert expected in msg, msg


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("run_id: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r.yaml line \d+: not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(p)


def test_cli_validate_one_line_and_exit_code(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(_mut(_set("opd.train.global_batch", -1))))
    proc = lopd_cli("recipe", "validate", "-r", str(p), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "opd.train.global_batch" in lines[0], proc.stderr
    ok = lopd_cli("recipe", "validate", "-r", str(TINY))
    assert ok.stdout.startswith("ok:")
    shown = lopd_cli("recipe", "show", "-r", str(TINY), "--set", "opd.optim.lr=3e-6")
    assert yaml.safe_load(shown.stdout)["opd"]["optim"]["lr"] == 3e-6
    bad_set = lopd_cli("recipe", "show", "-r", str(TINY), "--set", "opd.nope=1", check=False)
    assert bad_set.returncode == 2 and bad_set.stderr.strip() == "error: recipe error: opd.nope: unknown key"


# --------------------------------------------------------------------------- absurd sizes and alias bombs


def _refused_fast(fn, match: str) -> str:
    """Run ``fn``; it must raise a one-line RecipeError matching ``match`` within a second."""
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match=match) as exc:
        fn()
    assert time.perf_counter() - t0 < 1.0
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_every_size_field_has_an_upper_bound():
    """Every integer field of the recipe (seeds aside) has an upper bound, named in its docstring."""
    import annotated_types
    from pydantic import BaseModel

    unbounded = []

    def walk(model: type[BaseModel], path: str):
        for name, field in model.model_fields.items():
            ann = field.annotation
            args = getattr(ann, "__args__", (ann,))
            if int in args and bool not in args and "seed" not in name:
                if not any(isinstance(m, (annotated_types.Le, annotated_types.Lt)) for m in field.metadata):
                    unbounded.append(f"{path}{name}")
                elif "at most" not in " ".join((field.description or "").split()):
                    unbounded.append(f"{path}{name} (bound not documented)")
            for sub in args:
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub, f"{path}{name}.")
            for sub in getattr(args[-1], "__args__", ()) if getattr(ann, "__origin__", None) is dict else ():
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub, f"{path}{name}.*.")

    walk(Recipe, "")
    assert unbounded == []


ABSURD = ["opd.train.global_batch", "sft.train.steps", "opd.train.micro_batch_tokens", "opd.train.max_seq_len",
          "precompute.shards", "sft_data.part_size", "eval.k", "eval.part_size", "precompute.sampling.max_tokens",
          "precompute.sampling.n", "opd.mini_batches", "opd.logprob_chunk_tokens", "eval.inference.max_num_seqs",
          "opd.resources.nodes", "kubernetes.backoff_limit"]


@pytest.mark.parametrize("path", ABSURD)
def test_absurd_size_refused_fast_naming_the_key(path):
    data = _mut(_set(path, 10**12))
    msg = _refused_fast(lambda: validate_recipe(data), re.escape(path) + ": Input should be less than or equal to")
    assert msg.startswith("recipe error: ")


def test_huge_integers_in_a_recipe_file_are_one_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(base()) + "opd: {train: {steps: 1" + "0" * 5000 + "}}\n")
    _refused_fast(lambda: load_recipe(p), r"r.yaml line \d+: integer too long")
    p.write_text(yaml.safe_dump(base()) + "opd: {train: {steps: 0x1" + "f" * 5000 + "}}\n")
    msg = _refused_fast(lambda: load_recipe(p), r"opd.train.steps: Input should be less than or equal to 10000000")
    assert len(msg) < 200


def test_set_index_may_at_most_append():
    d = {"eval": {"benchmarks": ["a"]}}
    apply_set(d, "eval.benchmarks[1]=b")  # appends
    assert d["eval"]["benchmarks"] == ["a", "b"]
    apply_set(d, "new[0].x=1")  # a new list may take index 0
    assert d["new"] == [{"x": 1}]
    _refused_fast(lambda: apply_set(d, "eval.benchmarks[3]=c"),
                  r"eval.benchmarks\[3\]: index past the end of the list \(length 2")
    _refused_fast(lambda: apply_set(d, "eval.datasets[100000000000].name=x"),
                  r"eval.datasets\[100000000000\]: index past the end of the list \(length 0")
    _refused_fast(lambda: apply_set(d, "eval.benchmarks[" + "9" * 5000 + "]=x"),
                  r"list index \[9+\.\.\.\] is too large")


def test_cli_set_index_bomb_exit_2(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(base()))
    proc = lopd_cli("recipe", "validate", "-r", str(p), "--set", "eval.datasets[100000000000].name=x", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --set 'eval.datasets[100000000000].name=x': eval.datasets[100000000000]: index past the end of "
        "the list (length 0; an index may at most append)"]


def alias_bomb(levels: int) -> str:
    """A recipe whose free-form ``repro.variants.v.opd`` holds 10**levels strings in ~80 bytes a level."""
    lines = ["        a0: &a0 [" + ", ".join(["lol"] * 10) + "]"]
    lines += [f"        a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return yaml.safe_dump(base()) + "repro:\n  variants:\n    v:\n      opd:\n" + "\n".join(lines) + "\n"


def test_alias_bomb_refused_fast(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(alias_bomb(7))  # 10^7 strings: seconds to hash without the limit
    assert len(p.read_bytes()) < 1000
    _refused_fast(lambda: load_recipe(p).sha256(), r"bomb.yaml line \d+: aliases expand to more than 100000 nodes")
    p.write_text(yaml.safe_dump(base()) + "opd: &x {train: *x}\n")
    _refused_fast(lambda: load_recipe(p), r"bomb.yaml line \d+: recursive alias")
    p.write_text(yaml.safe_dump(base()) + "x: " + "[" * 50000 + "\n")
    _refused_fast(lambda: load_recipe(p), r"bomb.yaml( line \d+)?: .*(nesting depth|nested too deeply)")
    p.write_bytes(b"run_id: r\xff1\n")
    _refused_fast(lambda: load_recipe(p), r"bomb.yaml: not UTF-8 text \(byte 10\)")
    p.write_text(yaml.safe_dump(base()) + "x: &a [1, 2]\ny: *a\nsft: {train: {steps: 7}}\n")
    assert load_recipe_data(p)["y"] == [1, 2]  # a few aliases are fine


def test_cli_billion_laughs_exit_2(tmp_path):
    p = tmp_path / "bomb.yaml"
    p.write_text(alias_bomb(9))  # 10^9 strings
    proc = subprocess.run([sys.executable, "-m", "lopd.cli", "recipe", "validate", "-r", str(p)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-500:]
    assert proc.stderr.strip().splitlines() == [
        f"error: recipe error: {p} line 20: aliases expand to more than 100000 nodes"]


def test_student_dtype_is_the_training_dtype_and_float16_is_refused():
    assert load_recipe(TINY, ["models.student.dtype=bfloat16"]).models.student.dtype == "bfloat16"
    assert load_recipe(TINY, ["models.teacher.dtype=float16"]).models.teacher.dtype == "float16"  # inference only
    with pytest.raises(RecipeError, match=r"models\.student: .*float16 cannot be trained"):
        load_recipe(TINY, ["models.student.dtype=float16"])
