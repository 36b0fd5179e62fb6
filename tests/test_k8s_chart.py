"""The Helm chart through Helm's own engine (helm-python-sdk, no helm binary): lint, every stage
of the tiny and the paper recipes rendered and validated (core kinds with kubernetes-validate
--strict, PyTorchJobs against the packaged lopd/k8s/schemas/kubeflow.org_pytorchjobs.yaml with unknown
fields rejected), assertions on the rendered objects, values.schema.json rejecting bad values."""

from __future__ import annotations

import re
from pathlib import Path

import helm_python as helm_sdk
import pytest
import yaml

from lopd.k8s import CHART_DIR, helm
from lopd.k8s.validate import CRD_DIR, ManifestInvalid, validate_objects
from lopd.k8s.values import release_name, stage_values
from lopd.recipe import load_recipe, validate_recipe
from lopd.stages import STAGES as REGISTRY
from tests.helpers.cli import REPO

RECIPES = {name: REPO / "jobs" / "recipes" / f"{name}.yaml"
           for name in ("tiny", "qwen3-4b", "qwen3-8b", "qwen3-30b-a3b")}
STAGES = list(REGISTRY)


def rendered(recipe, stage: str) -> dict[str, str]:
    return helm.render(stage_values(recipe, stage), release_name(recipe.run_id, stage), recipe.kubernetes.namespace)


def objs_by_kind(recipe, stage: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for o in helm.objects(rendered(recipe, stage)):
        out.setdefault(o["kind"], []).append(o)
    return out


@pytest.fixture(scope="module")
def paper8b():
    return load_recipe(RECIPES["qwen3-8b"])


# --------------------------------------------------------------------------- lint and validation


def test_helm_lint_clean():
    assert helm_sdk.helm_sdk_version().startswith("v")  # Helm's Go SDK inside the wheel, no binary
    findings = helm.lint()
    assert [f for f in findings if f["severity"] >= 2] == [], findings
    tiny = load_recipe(RECIPES["tiny"])
    for stage in STAGES:  # lint with each stage's real values too
        assert [f for f in helm.lint(stage_values(tiny, stage)) if f["severity"] >= 2] == [], stage


def test_crd_schema_ships_with_the_package():
    crd = CRD_DIR / "kubeflow.org_pytorchjobs.yaml"
    assert crd.is_file() and Path(str(crd)).resolve() == REPO / "lopd" / "k8s" / "schemas" / crd.name
    assert "kind: CustomResourceDefinition" in crd.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_stage_renders_and_validates(name):
    r = load_recipe(RECIPES[name])
    kinds = {}
    for stage in STAGES:
        objs = helm.objects(rendered(r, stage))
        names = validate_objects(objs)
        assert names and all("/" in n for n in names)
        kinds[stage] = sorted(o["kind"] for o in objs)
    multi_node_sft = r.sft.resources.nodes > 1
    assert kinds["sft"] == sorted(["ConfigMap", "ServiceAccount", "PyTorchJob" if multi_node_sft else "Job"])
    for stage in ("sft-data", "precompute", "opd"):
        assert kinds[stage] == ["ConfigMap", "Job", "ServiceAccount"]
    assert kinds["eval"] == ["ConfigMap", "Job", "NetworkPolicy", "ServiceAccount"]


def test_validation_rejects_unknown_fields(paper8b):
    objs = helm.objects(rendered(paper8b, "sft"))
    pj = next(o for o in objs if o["kind"] == "PyTorchJob")
    pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(ManifestInvalid, match=r"PyTorchJob/lopd-qwen3-8b-sft: spec\.pytorchReplicaSpecs\.Worker"
                                              r"\.template\.spec\.containers\.0: Additional properties.*'gpus'"):
        validate_objects([pj])
    pj = next(o for o in helm.objects(rendered(paper8b, "sft")) if o["kind"] == "PyTorchJob")
    pj["spec"]["runPolicy"]["backoffLimit"] = "three"
    with pytest.raises(ManifestInvalid, match="runPolicy.backoffLimit"):
        validate_objects([pj])
    job = next(o for o in helm.objects(rendered(paper8b, "eval")) if o["kind"] == "Job")
    job["spec"]["template"]["spec"]["shmSize"] = "1Gi"
    with pytest.raises(ManifestInvalid, match=r"Job/lopd-qwen3-8b-eval: spec\.template\.spec: .*'shmSize'"):
        validate_objects([job])


# --------------------------------------------------------------------------- rendered objects


def test_inference_stage_objects(paper8b):
    k = objs_by_kind(paper8b, "precompute")
    job, cm, sa = k["Job"][0], k["ConfigMap"][0], k["ServiceAccount"][0]
    shards = paper8b.precompute.shards
    # shard index wiring: Indexed Job, one completion per shard, the entrypoint takes the shard
    # from JOB_COMPLETION_INDEX (no --shard-index) and the count from --num-shards
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == shards == 4
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["python", "-m", "jobs.precompute", "--recipe", "/etc/lopd/recipe.yaml",
                            "--num-shards", "4"]
    assert "--shard-index" not in c["command"]
    # GPUs, CPU, memory from precompute.resources
    res = paper8b.precompute.resources
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert c["resources"]["requests"]["cpu"] == res.cpu and c["resources"]["limits"]["memory"] == res.memory
    # /dev/shm as a memory emptyDir sized from the recipe
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    # the recipe: a ConfigMap mounted read-only where --recipe points, holding the resolved recipe
    assert vols["recipe"]["configMap"]["name"] == cm["metadata"]["name"]
    assert mounts["recipe"] == {"name": "recipe", "mountPath": "/etc/lopd", "readOnly": True}
    mounted = yaml.safe_load(cm["data"]["recipe.yaml"])
    assert validate_recipe(mounted).sha256() == paper8b.sha256()
    # node pool
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # security: non-root, no privilege escalation, capabilities dropped
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["privileged"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # S3 credentials only from the Secret reference; no AWS value in the pod spec or the recipe
    assert c["envFrom"] == [{"secretRef": {"name": "lopd-storage"}}]
    assert not [e for e in c["env"] if e["name"].startswith("AWS_")]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["HF_HOME"].startswith("/cache") and env["LOPD_STAGE"] == "precompute"
    # labels: Kubernetes recommended + lopd.io, on the Job and the pods; Kueue queue on the Job only
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["app.kubernetes.io/name"] == "lopd"
        assert labels["app.kubernetes.io/instance"] == "lopd-qwen3-8b-precompute"
        assert labels["app.kubernetes.io/component"] == "precompute"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "lopd" and labels["app.kubernetes.io/version"]
        assert labels["lopd.io/run"] == "qwen3-8b" and labels["lopd.io/stage"] == "precompute"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lopd"
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]
    # retries per shard: disruptions ignored, bad input (exit 2) fails its shard at once; TTL and
    # backoff from the recipe
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert rules[1]["action"] == "FailIndex" and rules[1]["onExitCodes"]["values"] == [2]
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimitPerIndex"] == 3 and "backoffLimit" not in job["spec"]
    assert job["spec"]["maxFailedIndexes"] == 4 and job["spec"]["ttlSecondsAfterFinished"] == 86400
    assert "activeDeadlineSeconds" not in job["spec"]


def test_multi_node_training_is_a_pytorchjob(paper8b):
    pj = objs_by_kind(paper8b, "sft")["PyTorchJob"][0]
    spec = pj["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == paper8b.sft.resources.nodes - 1 == 1
    for role in ("Master", "Worker"):
        # exit codes 1-127 (a bad recipe exits 2) are permanent, signals (128-255) restart the pod
        assert spec["pytorchReplicaSpecs"][role]["restartPolicy"] == "ExitCode"
        pod = spec["pytorchReplicaSpecs"][role]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"  # the training operator's default container
        assert c["command"] == ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
                                "-m", "jobs.sft", "--recipe", "/etc/lopd/recipe.yaml"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "128Gi"
    assert pj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lopd"
    assert spec["runPolicy"]["backoffLimit"] == 3


def test_single_node_training_is_a_torchrun_job(paper8b):
    job = objs_by_kind(paper8b, "opd")["Job"][0]
    assert "completionMode" not in job["spec"] and job["spec"]["completions"] == 1
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                            "--nproc-per-node=8", "-m", "jobs.opd", "--recipe", "/etc/lopd/recipe.yaml"]
    r = load_recipe(RECIPES["tiny"])  # CPU recipe: no GPU resources, one rank
    (c,) = objs_by_kind(r, "sft")["Job"][0]["spec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "--nproc-per-node=1" in c["command"]


def test_online_opd_gets_a_teacher_server():
    r = load_recipe(RECIPES["qwen3-8b"], ["opd.mode=online"])
    k = objs_by_kind(r, "opd")
    validate_objects([o for objs in k.values() for o in objs])
    dep, svc = k["Deployment"][0], k["Service"][0]
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # never two sets of 8-GPU teachers at once
    assert dep["spec"]["replicas"] == 1 and "PodMonitor" not in k
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:3] == ["python", "-m", "lopd.k8s.teacher"]
    assert c["command"][c["command"].index("--model") + 1] == "Qwen/Qwen3-32B"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and c["envFrom"][0]["secretRef"]["name"] == "lopd-storage"
    sel = svc["spec"]["selector"]
    assert all(dep["spec"]["template"]["metadata"]["labels"][k_] == v for k_, v in sel.items())
    assert dep["spec"]["selector"]["matchLabels"] == sel
    mounted = yaml.safe_load(k["ConfigMap"][0]["data"]["recipe.yaml"])
    port = svc["spec"]["ports"][0]["port"]
    assert mounted["opd"]["online"]["teacher_url"] == f"http://{svc['metadata']['name']}:{port}/v1"
    # other stages, and offline OPD, have no teacher server
    assert "Deployment" not in objs_by_kind(load_recipe(RECIPES["qwen3-8b"]), "opd")
    from lopd.k8s.teacher import vllm_command

    assert vllm_command("/m", 8000, 8, [])[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]


def test_irsa_existing_service_account_and_options():
    r = load_recipe(RECIPES["qwen3-8b"], [
        "kubernetes.irsa_role_arn=arn:aws:iam::111122223333:role/lopd", "kubernetes.storage_secret=null",
        "kubernetes.priority_class=batch-high", "kubernetes.queue=null", "eval.resources.active_deadline_seconds=7200",
        "kubernetes.image=registry.example.com:5000/ml/lopd@sha256:" + "a" * 64, "kubernetes.cache_pvc=hf-cache"])
    k = objs_by_kind(r, "eval")
    sa, job = k["ServiceAccount"][0], k["Job"][0]
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::111122223333:role/lopd"}
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "envFrom" not in c  # IRSA alone
    assert c["image"] == "registry.example.com:5000/ml/lopd@sha256:" + "a" * 64
    assert pod["priorityClassName"] == "batch-high" and job["spec"]["activeDeadlineSeconds"] == 7200
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert {v["name"]: v for v in pod["volumes"]}["cache"] == {"name": "cache",
                                                               "persistentVolumeClaim": {"claimName": "hf-cache"}}
    r2 = load_recipe(RECIPES["qwen3-8b"], ["kubernetes.service_account=lopd-job"])
    k2 = objs_by_kind(r2, "eval")
    assert "ServiceAccount" not in k2 and k2["Job"][0]["spec"]["template"]["spec"]["serviceAccountName"] == "lopd-job"


def test_release_names_fit_helm():
    long_run = "a" * 40
    names = {release_name(long_run, s) for s in STAGES} | {release_name(long_run[:-1] + "b", s) for s in STAGES}
    assert len(names) == 10
    for n in names:
        assert len(n) <= 53
        helm_sdk.validate_release_name(n)
    assert release_name("qwen3-8b", "sft-data") == "lopd-qwen3-8b-sft-data"


# --------------------------------------------------------------------------- values and schema


def _keys_with_comments(path: Path) -> list[tuple[str, bool]]:
    lines = path.read_text().splitlines()
    out, stack = [], []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        stack = [(d, k) for d, k in stack if d < indent] + [(indent, m.group(2))]
        j = i - 1
        documented = False
        while j >= 0 and lines[j].strip().startswith("#"):
            documented = documented or lines[j].strip().startswith("# --")
            j -= 1
        out.append((".".join(k for _, k in stack), documented))
    return out


def _schema_paths(schema: dict, prefix: str = "") -> set[str]:
    paths = set()
    for k, v in schema.get("properties", {}).items():
        p = f"{prefix}{k}"
        paths.add(p)
        if v.get("type") == "object" and "properties" in v:
            paths |= _schema_paths(v, p + ".")
    return paths


def test_every_values_key_documented_and_in_the_schema():
    keys = [(k, d) for k, d in _keys_with_comments(CHART_DIR / "values.yaml")
            if not k.startswith(("recipe.content.", "nodeSelector.", "tolerations."))]
    assert [k for k, d in keys if not d] == []
    with helm_sdk.Chart.load(str(CHART_DIR)) as c:
        schema = c.schema
    assert {k for k, _ in keys} == _schema_paths(schema) - {"global"}

    def strict(node, where="<root>"):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, where
        for k, v in node.get("properties", {}).items():
            strict(v, f"{where}.{k}")
        if isinstance(node.get("items"), dict):
            strict(node["items"], where + "[]")

    strict(schema)
    toggles = {k.rsplit(".", 1)[-1] for k, _ in keys} & {"create", "enable", "enabled", "disabled", "disable"}
    assert toggles == {"enabled"}


BAD_VALUES = [
    ("unknown top-level key", "replicas: 3\n", "additional properties 'replicas' not allowed"),
    ("unknown nested key", "resources: {gpus: 8}\n", "additional properties 'gpus' not allowed"),
    ("negative GPUs", "resources: {gpusPerNode: -1}\n", "/resources/gpusPerNode"),
    ("zero nodes", "resources: {nodes: 0}\n", "/resources/nodes"),
    ("bad image repository", "image: {repository: 'Not An Image'}\n", "/image/repository"),
    ("bad image digest", "image: {digest: 'md5:abc'}\n", "/image/digest"),
    ("bad stage name", "stage: Train_1\n", "/stage"),
    ("module outside jobs", "module: os.system\n", "/module"),
    ("training not a boolean", "training: maybe\n", "/training"),
    ("bad run id", "runId: My_Run\n", "/runId"),
    ("bad memory quantity", "resources: {memory: lots}\n", "/resources/memory"),
    ("bad shm quantity", "resources: {shmSize: 64 GB}\n", "/resources/shmSize"),
    ("zero shards", "shards: 0\n", "/shards"),
    ("negative backoff", "job: {backoffLimit: -1}\n", "/job/backoffLimit"),
    ("root user", "securityContext: {runAsUser: 0}\n", "/securityContext/runAsUser"),
    ("bad toleration operator", "tolerations: [{key: a, operator: Matches}]\n", "/tolerations/0/operator"),
    ("toleration unknown key", "tolerations: [{key: a, effects: NoSchedule}]\n", "'effects' not allowed"),
    ("secret inline in env", "env: [{name: AWS_SECRET_ACCESS_KEY, valueFrom: {secretKeyRef: {name: x}}}]\n",
     "'valueFrom' not allowed"),
    ("credentials under storage", "storage: {accessKey: AKIA}\n", "'accessKey' not allowed"),
    ("bad IRSA ARN", "serviceAccount: {irsaRoleArn: my-role}\n", "/serviceAccount/irsaRoleArn"),
    ("string toggle", "kueue: {enabled: 'yes'}\n", "/kueue/enabled"),
    ("empty recipe", "recipe: {content: ''}\n", "/recipe/content"),
    ("teacher port", "teacher: {port: 70000}\n", "/teacher/port"),
    ("pull policy", "image: {pullPolicy: Sometimes}\n", "/image/pullPolicy"),
]


@pytest.mark.parametrize("what,text,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_values_schema_rejects(tmp_path, what, text, message):
    f = tmp_path / "bad-values.yaml"
    f.write_text(text)
    values = helm_sdk.values_from_yaml(f.read_text())
    with helm_sdk.Chart.load(str(CHART_DIR)) as c:
        merged = c.merge_values(values)
        with pytest.raises(helm_sdk.HelmValuesError) as e:
            c.validate_schema(merged)
    assert message in str(e.value), str(e.value)
    # and `helm lint -f bad-values.yaml` (Helm's engine) reports the same as an error
    assert any(message in f_["error"] for f_ in helm.lint(values) if f_["severity"] == 3)


def test_default_values_render():
    out = helm.render({}, "lopd-run-sft-data", "lopd")
    assert {o["kind"] for o in helm.objects(out)} == {"ConfigMap", "Job", "ServiceAccount"}
    validate_objects(helm.objects(out))
    assert "kubectl -n lopd get job,pods -l lopd.io/run=run,lopd.io/stage=sft-data -w" in helm.notes(out)


# --------------------------------------------------------------------------- stage commands


def test_chart_commands_name_design_entrypoints():
    """The command of every stage is `python -m jobs.<module>` for a module docs/architecture.md
    lists, and every entrypoint is importable."""
    listed = set(re.findall(r"`jobs/(\w+)\.py`", (REPO / "docs" / "architecture.md").read_text()))
    r = load_recipe(RECIPES["tiny"])
    for stage, spec in REGISTRY.items():
        assert spec.module in listed
        job = next(o for o in helm.objects(rendered(r, stage)) if o["kind"] == "Job")
        cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
        assert spec.entrypoint in cmd and cmd[cmd.index(spec.entrypoint) - 1] == "-m"
    imports = "; ".join(f"import {s.entrypoint}" for s in REGISTRY.values())
    proc = run_python(f"{imports}; import lopd.k8s.teacher; print('ok')")
    assert proc.stdout.strip() == "ok", proc.stderr


def run_python(code: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
