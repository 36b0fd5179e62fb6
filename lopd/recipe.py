"""The run configuration ("recipe"): the top-level model, YAML loading and ``--set`` overrides.

The sections (one pydantic model per component, one docstring per field, unknown keys
rejected, the paper's defaults) live in :mod:`lopd.sections` and :mod:`lopd.cluster_config`
and are re-exported here; ``jobs/recipes/tiny.yaml`` shrinks them for a CPU. Every
validation problem becomes a :class:`RecipeError` whose one-line message names the key
path, e.g. ``recipe error: opd.global_batch: Input should be greater than 0``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, field_validator, model_validator

from lopd import LopdError
from lopd.cluster_config import KubernetesConfig, TeacherServerConfig, Toleration
from lopd.embedded_config import BootstrapConfig, InitModelSpec, ReproConfig, ReproVariant
from lopd.eval_config import EvalConfig, EvalDatasetConfig
from lopd.opd_config import ImportanceWeightsConfig, OnlineConfig, OpdConfig
from lopd.safe_yaml import YamlLimitError, load_yaml
from lopd.sections import (
    InferenceConfig,
    ModelsConfig,
    ModelSpec,
    PrecomputeConfig,
    ResourcesConfig,
    SamplingConfig,
    Section,
    SftDataConfig,
    validate_store_uri,
)
from lopd.train_config import OptimConfig, SftConfig, TrainConfig

__all__ = [
    "BootstrapConfig", "EvalConfig", "EvalDatasetConfig", "ImportanceWeightsConfig", "InferenceConfig",
    "InitModelSpec", "KubernetesConfig", "ModelSpec", "ModelsConfig", "OnlineConfig", "OpdConfig", "OptimConfig",
    "PrecomputeConfig", "Recipe", "RecipeError", "ReproConfig", "ReproVariant", "ResourcesConfig", "SamplingConfig",
    "Section", "SftConfig", "SftDataConfig", "TeacherServerConfig", "Toleration", "TrainConfig", "apply_set",
    "canonical_json", "format_validation_error", "load_recipe", "load_recipe_data", "parse_set", "recipe_yaml",
    "validate_recipe", "validate_store_uri",
]

RUN_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class RecipeError(LopdError):
    """A recipe that does not load or validate; the message names the key path."""


class Recipe(Section):
    """One experiment: models, store, and one section per stage."""

    run_id: str
    """Run name: lowercase letters, digits and '-', at most 40 characters (used in release names)."""
    store: str
    """Artifact store root: s3://bucket/prefix, file:///path, or a path."""
    models: ModelsConfig
    """Teacher and student base."""
    allow_inconsistent_teacher: bool = False
    """Ablation only: let precompute score with a teacher other than the SFT data's; recorded
    in every downstream manifest."""
    sft_data: SftDataConfig | None = None
    """Stage sft-data (None: the run has no such stage)."""
    sft: SftConfig = SftConfig()
    """Stage sft."""
    precompute: PrecomputeConfig | None = None
    """Stage precompute."""
    opd: OpdConfig = OpdConfig()
    """Stage opd."""
    eval: EvalConfig = EvalConfig()
    """Stage eval."""
    kubernetes: KubernetesConfig = KubernetesConfig()
    """Cluster settings the CLI turns into Helm values (image, namespace, node pool); see helm/lopd."""
    bootstrap: BootstrapConfig | None = None
    """Embedded default only: make the task data and models first (None: they exist)."""
    repro: ReproConfig | None = None
    """The paper's table at toy scale (``lopd repro``); None: the recipe has no study."""

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        if not RUN_ID_RE.match(v):
            raise ValueError(
                f"{v!r} is not a valid run id (lowercase letters, digits, '-', 1-40 chars, "
                "starting and ending with a letter or digit)"
            )
        return v

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        return validate_store_uri(v)

    @model_validator(mode="after")
    def _clips(self) -> Recipe:
        if self.opd.clip_low >= 1.0:
            raise ValueError("opd.clip_low must be < 1 (ratio lower bound 1 - clip_low must stay positive)")
        if self.opd.rounds > 1 and self.precompute is None:
            raise ValueError("opd.rounds: Lightning rounds sample and score each round in a precompute stage; "
                             "the recipe has no precompute section")
        return self

    def sha256(self) -> str:
        """Fingerprint of the resolved recipe (canonical JSON), recorded in every manifest."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace variation."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------- loading


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_clips()]",):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def format_validation_error(err: ValidationError, source: str = "recipe") -> str:
    """One line naming each bad key path: ``recipe error: a.b: message (got X)``."""
    parts = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {_short(got)})"
        parts.append(f"{_loc(loc)}: {msg}{shown}")
    return f"{source} error: " + "; ".join(parts)


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (a huge input stays a short, one-line message)."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python prints
        return f"an integer of about {value.bit_length() * 3 // 10} digits" if isinstance(value, int) else "?"
    return text if len(text) <= limit else text[:limit] + "..."


def parse_set(expr: str) -> tuple[list[str | int], Any]:
    """Parse one Helm-style ``--set`` expression ``a.b[0].c=value`` into (path, value).

    Values are YAML scalars (``true``, ``3``, ``1e-5``, ``null``); ``{a,b}`` is a list.
    """
    if "=" not in expr:
        raise RecipeError(f"--set {expr!r}: expected key.path=value")
    key, raw = expr.split("=", 1)
    if not key:
        raise RecipeError(f"--set {expr!r}: empty key")
    path: list[str | int] = []
    for token in key.split("."):
        m = re.fullmatch(r"([A-Za-z0-9_\-]+)((?:\[\d+\])*)", token)
        if not m:
            raise RecipeError(f"--set {expr!r}: bad key segment {token!r}")
        path.append(m.group(1))
        for digits in re.findall(r"\[(\d+)\]", m.group(2)):
            if len(digits) > 18:
                raise RecipeError(f"--set {_short(expr)}: list index [{digits[:18]}...] is too large")
            path.append(int(digits))
    if raw.startswith("{") and raw.endswith("}"):
        value: Any = [_set_scalar(x) for x in raw[1:-1].split(",")] if raw[1:-1] else []
    else:
        value = _set_scalar(raw) if raw != "" else ""
        if isinstance(value, (dict, list)):  # only scalars, like helm --set
            value = raw
        elif isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
            value = float(value)  # YAML 1.1 reads 1e-5 as a string
    return path, value


def _set_scalar(raw: str) -> Any:
    """One ``--set`` value read as YAML; text that YAML refuses (or that breaks a size limit) stays a string."""
    try:
        return load_yaml(raw)
    except yaml.YAMLError:
        return raw


def apply_set(data: dict[str, Any], expr: str) -> None:
    """Apply one ``--set`` override in place. As with Helm, missing or scalar intermediate
    nodes become mappings (or lists for ``[i]``); validation then names any bad key. A list index
    may at most append (index <= the list's length)."""
    path, value = parse_set(expr)
    node: Any = data
    for i, part in enumerate(path):
        if isinstance(part, int):
            if part > len(node):
                where = _loc(tuple(path[:i]))
                raise RecipeError(f"--set {_short(expr)}: {where}[{part}]: index past the end of the list "
                                  f"(length {len(node)}; an index may at most append)")
            if part == len(node):
                node.append(None)
        if i == len(path) - 1:
            node[part] = value
            return
        want = dict if isinstance(path[i + 1], str) else list
        current = node[part] if isinstance(part, int) else node.get(part)
        if not isinstance(current, want):
            node[part] = want()
        node = node[part]


def load_recipe_data(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read the recipe YAML and apply overrides; returns the raw mapping (not yet validated)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe error: file not found: {p}")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RecipeError(f"recipe error: {p}: not UTF-8 text (byte {e.start + 1})") from None
    except YamlLimitError as e:
        mark = e.problem_mark
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe error: {p}{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe error: {p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe error: {p}: top level must be a mapping, got {type(data).__name__}")
    for expr in overrides:
        apply_set(data, expr)
    return data


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a mapping into a :class:`Recipe`, turning errors into one line."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, override and validate a recipe file."""
    return validate_recipe(load_recipe_data(path, overrides))


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (all defaults filled in), e.g. for the pods' ConfigMap."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
