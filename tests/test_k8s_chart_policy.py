"""Cluster policy in the rendered chart (Helm's engine, validated strictly): per-shard retries,
termination messages, Kueue queue labels on every GPU workload, the eval NetworkPolicy and
hardening, the teacher's replicas, probes and PodMonitor; Kueue manifests on the current API."""

from __future__ import annotations

import pytest
import yaml

from lopd.k8s import helm
from lopd.k8s.validate import validate_objects
from lopd.k8s.values import driver_values, release_name, stage_values
from lopd.recipe import load_recipe, validate_recipe
from lopd.stages import stages_of
from tests.helpers.cli import REPO

PAPER = REPO / "jobs" / "recipes" / "qwen3-8b.yaml"
ONLINE = ["opd.mode=online", "kubernetes.teacher_server.replicas=2", "kubernetes.teacher_server.pod_monitor=true",
          "kubernetes.workload_priority_class=lopd-repro"]


def _objects(recipe) -> list[dict]:
    out = []
    for s in stages_of(recipe):
        objs = helm.objects(helm.render(stage_values(recipe, s), release_name(recipe.run_id, s), "lopd"))
        validate_objects(objs)
        out += objs
    driver = helm.objects(helm.render(driver_values(recipe), release_name(recipe.run_id, "driver"), "lopd"))
    validate_objects(driver)
    return out + driver


@pytest.fixture(scope="module")
def online():
    return _objects(load_recipe(PAPER, ONLINE))


def _pod_specs(objs):
    for o in objs:
        if o["kind"] in ("Job", "Deployment"):
            yield o, o["spec"]["template"]["spec"]
        elif o["kind"] == "PyTorchJob":
            for rs in o["spec"]["pytorchReplicaSpecs"].values():
                yield o, rs["template"]["spec"]


def test_indexed_jobs_retry_per_shard(online):
    jobs = [o for o in online if o["kind"] == "Job"]
    indexed = [j for j in jobs if j["spec"].get("completionMode") == "Indexed"]
    assert {j["metadata"]["labels"]["lopd.io/stage"] for j in indexed} == {"sft-data", "precompute", "eval"}
    for j in indexed:
        spec = j["spec"]
        assert spec["backoffLimitPerIndex"] == 3 and "backoffLimit" not in spec
        assert 0 < spec["maxFailedIndexes"] <= spec["completions"]
        rules = spec["podFailurePolicy"]["rules"]
        assert rules[0]["action"] == "Ignore" and rules[0]["onPodConditions"][0]["type"] == "DisruptionTarget"
        assert (rules[1]["action"], rules[1]["onExitCodes"]["values"]) == ("FailIndex", [2])
    for j in jobs:
        if j not in indexed:  # single-node training and the driver: the Job as a whole
            assert "backoffLimitPerIndex" not in j["spec"] and j["spec"]["podFailurePolicy"]["rules"][1]["action"] == \
                "FailJob"
    r = load_recipe(PAPER, ["precompute.shards=4"])
    v = stage_values(r, "precompute")
    v["job"]["maxFailedIndexes"] = 1
    job = next(o for o in helm.objects(helm.render(v, "lopd-x-precompute", "lopd")) if o["kind"] == "Job")
    assert job["spec"]["maxFailedIndexes"] == 1 and validate_objects([job])


def test_every_container_writes_a_termination_message(online):
    kinds = set()
    for o, pod in _pod_specs(online):
        kinds.add(o["kind"])
        for c in pod["containers"]:
            assert c["terminationMessagePolicy"] == "FallbackToLogsOnError", o["metadata"]["name"]
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env["LOPD_TERMINATION_LOG"] == "/dev/termination-log"
    assert kinds == {"Job", "PyTorchJob", "Deployment"}


def test_queue_labels_on_every_gpu_workload(online):
    gpu = [(o, pod) for o, pod in _pod_specs(online)
           if any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {}) for c in pod["containers"])]
    assert {o["kind"] for o, _ in gpu} == {"Job", "PyTorchJob", "Deployment"}
    for o, _ in gpu:
        labels = o["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "lopd", o["metadata"]["name"]
        assert labels["kueue.x-k8s.io/priority-class"] == "lopd-repro"
    dep = next(o for o, _ in gpu if o["kind"] == "Deployment")
    assert dep["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lopd"
    without = _objects(load_recipe(PAPER, ["kubernetes.queue=null"]))
    assert not [o for o in without if "kueue.x-k8s.io/queue-name" in str(o["metadata"].get("labels"))]


def test_eval_networkpolicy_and_hardening(online):
    (pol,) = [o for o in online if o["kind"] == "NetworkPolicy"]
    ev = next(o for o in online if o["kind"] == "Job" and o["metadata"]["labels"]["lopd.io/stage"] == "eval")
    pod_labels = ev["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels[k] == v for k, v in pol["spec"]["podSelector"]["matchLabels"].items())
    assert pol["spec"]["policyTypes"] == ["Ingress", "Egress"] and pol["spec"]["ingress"] == []
    dns, store = pol["spec"]["egress"]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    assert store == {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 443}]}
    data = load_recipe(PAPER).model_dump(mode="json", exclude_unset=True)
    data["kubernetes"].update(store_egress_cidrs=["10.20.0.0/16"], store_egress_ports=[9000])
    r = validate_recipe(data)
    objs = helm.objects(helm.render(stage_values(r, "eval"), "lopd-x-eval", "lopd"))
    pol2 = next(o for o in objs if o["kind"] == "NetworkPolicy")
    assert pol2["spec"]["egress"][1] == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
                                         "ports": [{"protocol": "TCP", "port": 9000}]}
    # no API token in any stage pod (only the driver talks to the API); the grader non-dumpable
    for o, pod in _pod_specs(online):
        driver = o["metadata"]["labels"]["lopd.io/stage"] == "driver"
        assert pod["automountServiceAccountToken"] is driver, o["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in ev["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LOPD_UNDUMPABLE"] == "1"


def test_teacher_replicas_probes_and_podmonitor(online):
    dep = next(o for o in online if o["kind"] == "Deployment")
    (mon,) = [o for o in online if o["kind"] == "PodMonitor"]
    assert dep["spec"]["replicas"] == 2
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert all(dep["spec"]["template"]["metadata"]["labels"][k] == v
               for k, v in mon["spec"]["selector"]["matchLabels"].items())
    assert mon["spec"]["podMetricsEndpoints"] == [{"port": "http", "path": "/metrics", "interval": "30s"}]


def test_kueue_manifests_on_the_current_api():
    docs = [d for d in yaml.safe_load_all((REPO / "manifests" / "kueue.yaml").read_text()) if d]
    assert {d["apiVersion"] for d in docs} == {"kueue.x-k8s.io/v1beta2"}
    assert sorted(validate_objects(docs)) == ["ClusterQueue/lopd-h100", "LocalQueue/lopd", "ResourceFlavor/h100",
                                              "WorkloadPriorityClass/lopd-batch", "WorkloadPriorityClass/lopd-repro"]
    bad = [{**docs[2], "spec": {"clusterQueue": "x", "cohort": "old-field"}}]
    with pytest.raises(Exception, match="cohort"):
        validate_objects(bad)
    cfg = yaml.safe_load((REPO / "manifests" / "kueue-config.yaml").read_text())
    assert (cfg["apiVersion"], cfg["kind"]) == ("config.kueue.x-k8s.io/v1beta2", "Configuration")
    assert {"batch/job", "kubeflow.org/pytorchjob", "deployment"} <= set(cfg["integrations"]["frameworks"])
