"""`lopd render`/`deploy` from the command line, `make manifests` up to date, the Makefile targets,
the Dockerfile (not buildable here: what it copies exists, the commands it relies on exist),
cluster prerequisites under manifests/, and the paper recipes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import helm_python as helm_sdk
import pytest
import yaml

from lopd.k8s import CHART_DIR
from lopd.k8s.validate import validate_objects
from lopd.recipe import load_recipe
from lopd.stages import STAGES
from tests.helpers.cli import REPO, lopd_cli

TINY = str(REPO / "jobs" / "recipes" / "tiny.yaml")
PAPER = {n: REPO / "jobs" / "recipes" / f"{n}.yaml" for n in ("qwen3-4b", "qwen3-8b", "qwen3-30b-a3b")}


# --------------------------------------------------------------------------- CLI


def test_render_values_to_file_and_manifests(tmp_path):
    out = tmp_path / "v.yaml"
    lopd_cli("render", "precompute", "-r", TINY, "--set", "precompute.shards=5", "-o", str(out))
    values = yaml.safe_load(out.read_text())
    assert values["stage"] == "precompute" and values["shards"] == 5
    assert yaml.safe_load(values["recipe"]["content"])["precompute"]["shards"] == 5
    with helm_sdk.Chart.load(str(CHART_DIR)) as c:  # the printed values satisfy the chart's schema
        c.validate_schema(values)
    text = lopd_cli("render", "precompute", "-r", TINY, "--set", "precompute.shards=5", "--manifests").stdout
    objs = [d for d in yaml.safe_load_all(text) if d]
    validate_objects(objs)
    assert next(o for o in objs if o["kind"] == "Job")["spec"]["completions"] == 5
    assert "# Source: lopd/templates/job.yaml" in text


@pytest.mark.parametrize("args,message", [
    (["sft", "--set", "sft.resources.gpus_per_node=-1"], "recipe error: sft.resources.gpus_per_node: Input should "
                                                         "be greater than or equal to 0 (got -1)"),
    (["sft", "--set", "kubernetes.bogus=1"], "recipe error: kubernetes.bogus: unknown key"),
    (["sft", "--set", "kubernetes.image=Not An Image"], "recipe error: kubernetes.image: "),
    (["sft", "--set", "kubernetes.namespace=Prod_NS"], "recipe error: kubernetes.namespace: "),
    (["sft", "--set", "kubernetes.tolerations[0].operator=Sometimes"], "recipe error: kubernetes.tolerations[0]"
                                                                       ".operator: "),
    (["eval", "--set", "eval.resources.nodes=2"], "recipe error: eval.resources.nodes: inference stages run one pod "
                                                  "per shard; use eval.shards instead (got 2)"),
    (["precompute", "--set", "precompute=null"], "recipe error: precompute: the recipe has no such section"),
    (["sft", "--set", "run_id=Bad_Run"], "recipe error: run_id: "),
])
def test_render_recipe_errors_are_one_line(args, message):
    stage, *rest = args
    r = lopd_cli("render", stage, "-r", TINY, *rest, check=False)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: " + message), r.stderr
    missing = lopd_cli("render", "sft", "-r", "nope.yaml", check=False)
    assert missing.returncode == 2 and "recipe error: file not found: nope.yaml" in missing.stderr


def test_deploy_dry_run_and_unreachable_cluster(tmp_path):
    r = lopd_cli("deploy", "sft", "-r", str(PAPER["qwen3-8b"]), "--dry-run")
    objs = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert {o["kind"] for o in objs} == {"ConfigMap", "PyTorchJob", "ServiceAccount"}
    assert "kubectl -n lopd get pytorchjob,pods -l lopd.io/run=qwen3-8b,lopd.io/stage=sft -w" in r.stderr
    kc = tmp_path / "kc"
    kc.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "x", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "x", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "x", "user": "x"}}]}))
    env = {"KUBECONFIG": str(kc), "PATH": os.path.dirname(sys.executable)}  # no helm binary: the SDK path
    bad = lopd_cli("deploy", "sft", "-r", TINY, check=False, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: helm upgrade --install lopd-tiny-sft: kubernetes cluster unreachable")


# --------------------------------------------------------------------------- make


# the suite itself runs under `make test`: a child make must not inherit its flags or print directories
MAKE = ["make", "--no-print-directory"]
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def test_make_manifests_is_up_to_date(tmp_path):
    """Regenerate manifests/rendered/ into a temporary directory and diff with the committed one."""
    if not shutil.which("make"):
        pytest.skip("make not installed")
    subprocess.run([*MAKE, "-s", "manifests", f"PY={sys.executable}", f"MANIFESTS_OUT={tmp_path}"], cwd=REPO,
                   env=MAKE_ENV, check=True, capture_output=True, text=True)
    committed = REPO / "manifests" / "rendered" / "qwen3-8b"
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert fresh == sorted(p.name for p in committed.iterdir())
    assert fresh == sorted([f"{s}.yaml" for s in STAGES] + [f"{s}.values.yaml" for s in STAGES])
    stale = [n for n in fresh if (tmp_path / n).read_text() != (committed / n).read_text()]
    assert not stale, f"manifests/rendered is stale ({stale}): run `make manifests`"
    for s in STAGES:
        validate_objects([d for d in yaml.safe_load_all((committed / f"{s}.yaml").read_text()) if d])


def test_makefile_targets():
    if not shutil.which("make"):
        pytest.skip("make not installed")
    for stage in STAGES:
        out = subprocess.run([*MAKE, "-n", f"deploy-{stage}", "RECIPE=r.yaml", "PY=py"], cwd=REPO, env=MAKE_ENV,
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == f"py -m lopd.cli deploy {stage} --recipe r.yaml"
    for target, want in [("status", "py -m lopd.cli status --recipe r.yaml"),
                         ("logs", "py -m lopd.cli logs opd --recipe r.yaml"),
                         ("image", "docker build -t ghcr.io/lopd/lopd:0.1.0 ."),
                         ("deploy-pipeline", "py -m lopd.cli pipeline --backend k8s --detach --recipe r.yaml"),
                         ("cancel", "py -m lopd.cli cancel --recipe r.yaml")]:
        out = subprocess.run([*MAKE, "-n", target, "RECIPE=r.yaml", "PY=py", "STAGE=opd"], cwd=REPO, env=MAKE_ENV,
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == want


def test_ci_repro_on_cluster_script():
    """The CI example submits and walks away: --detach, a bounded wait on the driver, cancel on
    timeout, the eval summary compared with an expected file; it is not the test entrypoint."""
    script = REPO / ".ci" / "repro-on-cluster.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for part in ("pipeline --backend k8s --detach", "status --recipe", "cancel --recipe", "report --recipe",
                 "TIMEOUT_S", "EXPECTED"):
        assert part in text, part
    assert "repro-on-cluster" not in (REPO / ".ci" / "run").read_text()
    expected = json.loads((REPO / ".ci" / "repro-on-cluster.expected.json").read_text())
    assert expected["results"] and expected["tolerance"] > 0


# --------------------------------------------------------------------------- Dockerfile


def _dockerfile():
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_copies_existing_files_not_ignored():
    text = _dockerfile()
    sources = [s for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M) for s in line.split()[:-1]]
    assert sources and "lopd" in sources and "jobs" in sources and "helm" in sources
    ignored = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for s in sources:
        assert (REPO / s).exists(), s
        assert not any(s == i or s.startswith(i.rstrip("/") + "/") for i in ignored), f"{s} is dockerignored"
    for i in (".git", ".venv", "runs", "tests"):
        assert i in ignored


def test_dockerfile_runtime_contract():
    text = _dockerfile()
    assert re.search(r"^FROM \$\{VLLM_IMAGE\}$", text, re.M) and "ARG VLLM_IMAGE=vllm/vllm-openai:" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and not users[-1].startswith(("0", "root"))  # non-root at run time
    assert "LOPD_UID=1000" in text  # matches the chart's securityContext.runAsUser
    with helm_sdk.Chart.load(str(CHART_DIR)) as c:
        assert c.values["securityContext"]["runAsUser"] == 1000
    assert "HF_HOME=/cache/hf" in text and "LOPD_CACHE=/cache/lopd" in text
    pinned = re.search(r'pip install -c (\S+) "\.\[([\w,]+)\]"', text)  # the pins `make setup` uses
    assert pinned and "requirements/constraints.txt" in text, "the image must install with the lock's pins"
    extras = pinned.group(2).split(",")
    declared = (REPO / "pyproject.toml").read_text()
    for extra in extras:
        assert re.search(rf"^{extra} = \[", declared, re.M), extra
    assert "deepspeed" in declared and "import lopd, jobs, deepspeed, vllm, torch" in text


# --------------------------------------------------------------------------- manifests/


def test_cluster_prerequisites():
    core = []
    for f in ("namespace.yaml", "rbac.yaml", "storage-secret.example.yaml"):
        core += [d for d in yaml.safe_load_all((REPO / "manifests" / f).read_text()) if d]
    names = validate_objects(core)
    assert {"Namespace/lopd", "Role/lopd-deployer", "RoleBinding/lopd-deployer", "ServiceAccount/lopd-deployer",
            "ServiceAccount/lopd-job", "Secret/lopd-storage"} <= set(names)
    secret = next(o for o in core if o["kind"] == "Secret")
    assert all(v in ("REPLACE_ME",) or k in ("AWS_REGION", "AWS_ENDPOINT_URL")
               for k, v in secret["stringData"].items())  # no real credentials
    rules = next(o for o in core if o["kind"] == "Role")["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("batch", "jobs"), ("kubeflow.org", "pytorchjobs"), ("", "pods/log"), ("", "secrets")} <= granted
    kueue = {d["kind"]: d for d in yaml.safe_load_all((REPO / "manifests" / "kueue.yaml").read_text()) if d}
    assert set(kueue) == {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"}
    r = load_recipe(PAPER["qwen3-8b"])
    assert kueue["LocalQueue"]["metadata"]["name"] == r.kubernetes.queue
    assert kueue["LocalQueue"]["metadata"]["namespace"] == r.kubernetes.namespace
    assert kueue["ResourceFlavor"]["spec"]["nodeLabels"] == r.kubernetes.node_selector
    gpus = kueue["ClusterQueue"]["spec"]["resourceGroups"][0]["flavors"][0]["resources"][2]
    assert gpus["name"] == "nvidia.com/gpu" and gpus["nominalQuota"] >= 8 * r.sft.resources.nodes


# --------------------------------------------------------------------------- paper recipes


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_recipes(name):
    text = PAPER[name].read_text()
    head = text.split("\nrun_id:")[0]
    assert f"lopd pipeline --backend k8s -r jobs/recipes/{name}.yaml" in head
    for stage in STAGES:
        assert f"make deploy-{stage}" in head
    assert "Expected time" in head
    r = load_recipe(PAPER[name])
    assert r.run_id == name
    # the paper's hyper-parameters (docs/architecture.md)
    assert (r.opd.mode, r.opd.optim.lr, r.opd.optim.schedule, r.opd.optim.betas) == ("offline", 2e-6, "constant",
                                                                                      (0.9, 0.98))
    assert (r.opd.optim.weight_decay, r.opd.optim.grad_clip, r.opd.clip_low, r.opd.clip_high) == (0.1, 1.0, 0.2, 0.2)
    assert (r.opd.train.global_batch, r.opd.train.steps, r.precompute.sampling.max_tokens) == (256, 150, 4096)
    assert r.precompute.sampling.n == 1
    assert (r.sft.optim.lr, r.sft.optim.schedule, r.sft.optim.warmup_ratio, r.sft.train.steps) == (8e-5, "cosine",
                                                                                                   0.1, 3000)
    assert (r.sft_data.sampling.temperature, r.sft_data.sampling.top_p) == (0.7, 0.9)
    assert r.sft.packing
    # one 8×H100 node per stage (SFT may span nodes); inference shards fill the node exactly
    for sec in (r.sft_data, r.precompute, r.eval):
        assert sec.resources.gpus_per_node * sec.shards == 8
        assert sec.inference.tensor_parallel_size == sec.resources.gpus_per_node
    assert r.opd.resources.nodes == 1 and r.opd.resources.gpus_per_node == 8
    assert r.sft.resources.gpus_per_node == 8
    teacher, student = {"qwen3-4b": ("Qwen/Qwen3-8B", "Qwen/Qwen3-4B-Base"),
                        "qwen3-8b": ("Qwen/Qwen3-32B", "Qwen/Qwen3-8B-Base"),
                        "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B-Thinking-2507", "Qwen/Qwen3-30B-A3B-Base")}[name]
    assert (r.models.teacher.uri, r.models.student.uri) == (teacher, student)
    assert r.store.startswith("s3://")
