"""The in-cluster pipeline driver (lopd.k8s.driver) against recorded API responses: stage order,
published stages skipped, a killed driver pod resumed, a failed stage, cancel, re-submission; and
its Job rendered and validated like the stages'. The cluster is the loopback replay of
tests/test_k8s_status.py (tests/fixtures/k8s); the store is a real file store."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from lopd.k8s import K8sError, helm
from lopd.k8s.cluster import Cluster
from lopd.k8s.driver import cancel_key, drive, submit
from lopd.k8s.pipeline import workload_status_fn
from lopd.k8s.status import progress_key
from lopd.k8s.validate import validate_objects
from lopd.k8s.values import driver_values, release_name, stage_values
from lopd.layout import stage_prefix
from lopd.recipe import load_recipe
from lopd.stages import stages_of
from lopd.store import open_store
from tests.helpers.cli import REPO, lopd_cli
from tests.test_k8s_status import FIXTURES, FX, TINY, Replay, _publish, load, midway_store  # noqa: F401

JOBS = "/apis/batch/v1/namespaces/lopd/jobs"
DEPLOYMENTS = "/apis/apps/v1/namespaces/lopd/deployments"


def _recipe(store: str):
    return load_recipe(TINY, [o for o in FX if o != "--set"] + [f"store={store}"])


class _Killed(BaseException):
    """The driver pod killed mid-wait."""


@pytest.fixture
def cluster_of(tmp_path):
    """``scenario dict -> (replay, Cluster)``; the driver Job can be added to any scenario."""
    replays = []

    def make(scenario: dict, driver: str | None = None):
        sc = copy.deepcopy(scenario)
        if driver:
            sc["responses"].setdefault(JOBS, {"kind": "JobList", "apiVersion": "batch/v1", "items": []})
            sc["responses"][JOBS]["items"].insert(0, json.loads((FIXTURES / "driver-job.json").read_text())[driver])
        sc["responses"].setdefault(DEPLOYMENTS, {"kind": "DeploymentList", "apiVersion": "apps/v1", "items": []})
        rp = Replay(sc)
        replays.append(rp)
        return rp, Cluster("lopd", str(rp.kubeconfig(tmp_path / f"kubeconfig-{len(replays)}")))

    yield make
    for rp in replays:
        rp.close()


def _publisher(store, tmp_path, deployed: list[str]):
    def deploy(stage: str) -> str:  # a workload that finishes at once
        deployed.append(stage)
        _publish(store, stage_prefix("fx", stage), tmp_path, stage)
        return f"installed {stage}"
    return deploy


def test_driver_runs_stages_in_order_and_skips_published(cluster_of, tmp_path):
    rp, cluster = cluster_of(load("run-no-training-operator"))
    uri = f"file://{tmp_path / 'store'}"
    store, recipe = open_store(uri), _recipe(uri)
    _publish(store, stage_prefix("fx", "sft-data"), tmp_path, "sft-data")
    deployed, said = [], []
    prog = drive(recipe, store, _publisher(store, tmp_path, deployed), workload_status_fn(cluster, "fx"),
                 lambda s: pytest.fail("nothing failed"), said.append, poll=0, sleep=lambda s: None)
    assert deployed == [s for s in stages_of(recipe) if s != "sft-data"] == ["sft", "precompute", "opd", "eval"]
    assert said[0] == "skip sft-data: already published"
    assert prog["state"] == "succeeded" and store.read_json(progress_key("fx")) == prog
    assert {s: v["state"] for s, v in prog["stages"].items()} == dict.fromkeys(stages_of(recipe), "Published")
    rows = {r["stage"]: r for r in json.loads(lopd_cli("status", "-r", TINY, *FX, "--set", f"store={uri}",
                                                       "--kubeconfig", str(tmp_path / "kubeconfig-1"),
                                                       "--json").stdout)}
    assert list(rows)[0] == "driver" and rows["driver"]["state"] == "Succeeded"
    assert all(rows[s]["published"] for s in stages_of(recipe))


def test_driver_resumes_after_its_pod_is_killed(cluster_of, tmp_path, midway_store):  # noqa: F811
    """precompute's Job (run-midway: running 2/4) is not deployed again by the next driver pod."""
    rp, cluster = cluster_of(load("run-midway"), driver="running")
    store, recipe = open_store(midway_store), _recipe(midway_store)
    status_of = workload_status_fn(cluster, "fx")
    deployed: list[str] = []
    deploy = _publisher(store, tmp_path, deployed)

    def killed(_):
        raise _Killed

    with pytest.raises(_Killed):
        drive(recipe, store, deploy, status_of, lambda s: None, lambda m: None, poll=0, sleep=killed)
    mid = store.read_json(progress_key("fx"))
    assert (mid["state"], mid["current"], mid["attempts"]) == ("running", "precompute", 1)
    assert deployed == []  # precompute was already running: waited for, not redeployed
    row = json.loads(lopd_cli("status", "-r", TINY, *FX, "--set", f"store={midway_store}", "--kubeconfig",
                              str(tmp_path / "kubeconfig-1"), "--json").stdout)[0]
    assert (row["stage"], row["kind"], row["state"]) == ("driver", "Job", "Running")
    assert "at precompute" in row["detail"]

    def precompute_finishes(_):
        _publish(store, stage_prefix("fx", "precompute"), tmp_path, "precompute")

    prog = drive(recipe, store, deploy, status_of, lambda s: None, lambda m: None, poll=0,
                 sleep=precompute_finishes)
    assert deployed == ["opd", "eval"] and prog["state"] == "succeeded" and prog["attempts"] == 2


def test_driver_failed_stage_is_retried_once_then_fails(cluster_of, tmp_path):
    """run-failing: sft-data failed (exit 2). A re-submitted driver deletes the failed Job and deploys
    it again; when it fails again the driver stops with one line and records why."""
    rp, cluster = cluster_of(load("run-failing"))
    failed_job = next(j for j in rp.scenario["responses"][JOBS]["items"]
                      if j["metadata"]["name"] == "lopd-fx-sft-data")
    uri = f"file://{tmp_path / 'store'}"
    store, recipe = open_store(uri), _recipe(uri)
    removed, deployed = [], []

    def remove(stage):
        removed.append(stage)
        cluster.delete("Job", f"lopd-fx-{stage}")

    def deploy(stage):  # the same failure again
        deployed.append(stage)
        rp.scenario["responses"][JOBS]["items"].append(copy.deepcopy(failed_job))
        return "installed"

    with pytest.raises(K8sError, match=r"^stage sft-data failed: .*") as e:
        drive(recipe, store, deploy, workload_status_fn(cluster, "fx"), remove, lambda m: None, poll=0,
              sleep=lambda s: None)
    assert "\n" not in str(e.value)
    assert removed == deployed == ["sft-data"]
    assert f"DELETE {JOBS}/lopd-fx-sft-data" in rp.requests
    prog = store.read_json(progress_key("fx"))
    assert prog["state"] == "failed" and prog["stages"]["sft-data"]["state"] == "Failed"


def test_driver_cancel_stops_driver_and_children(cluster_of, tmp_path, midway_store):  # noqa: F811
    rp, cluster = cluster_of(load("run-midway"), driver="running")
    store, recipe = open_store(midway_store), _recipe(midway_store)
    kubecfg = str(tmp_path / "kubeconfig-1")

    def user_cancels(_):
        out = lopd_cli("cancel", "-r", TINY, *FX, "--set", f"store={midway_store}", "--kubeconfig", kubecfg).stdout
        assert out.startswith("cancelled run fx: deleted Job/lopd-fx-driver")

    prog = drive(recipe, store, lambda s: pytest.fail("nothing to deploy"), workload_status_fn(cluster, "fx"),
                 lambda s: None, lambda m: None, poll=0, sleep=user_cancels)
    assert prog["state"] == "cancelled" and store.read_json(progress_key("fx"))["state"] == "cancelled"
    deletes = [r for r in rp.requests if r.startswith("DELETE")]
    assert deletes[0] == f"DELETE {JOBS}/lopd-fx-driver"
    assert set(deletes) == {f"DELETE {JOBS}/lopd-fx-driver", f"DELETE {JOBS}/lopd-fx-sft-data",
                            f"DELETE {JOBS}/lopd-fx-precompute",
                            "DELETE /apis/kubeflow.org/v1/namespaces/lopd/pytorchjobs/lopd-fx-sft"}
    assert rp.scenario["responses"][JOBS]["items"] == []


def test_driver_submit_resumes_and_leaves_a_running_driver(cluster_of, tmp_path, midway_store):  # noqa: F811
    store, recipe = open_store(midway_store), _recipe(midway_store)
    installs, said = [], []
    _, cluster = cluster_of(load("run-midway"), driver="running")
    submit(recipe, store, cluster, said.append, install=lambda *a: installs.append(a) or "x")
    assert installs == [] and "already Running" in said[0]

    store.write_json(cancel_key("fx"), {"requested": "earlier"})
    rp, cluster = cluster_of(load("run-midway"), driver="finished")
    submit(recipe, store, cluster, said.append, install=lambda *a: installs.append(a) or "x")
    (values, release, ns), = installs
    assert (release, ns, values["driver"]["enabled"]) == (release_name("fx", "driver"), "lopd", True)
    assert f"DELETE {JOBS}/lopd-fx-driver" in rp.requests and not store.exists(cancel_key("fx"))


def test_driver_job_renders_validates_and_its_rbac_covers_the_chart(tmp_path):
    recipe = _recipe(f"file://{tmp_path}")
    objs = helm.objects(helm.render(driver_values(recipe), release_name("fx", "driver"), "lopd"))
    assert sorted(validate_objects(objs)) == ["ConfigMap/lopd-fx-driver-recipe", "Job/lopd-fx-driver"]
    job = next(o for o in objs if o["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:3] == ["python", "-m", "lopd.k8s.driver"]
    assert (pod["serviceAccountName"], pod["automountServiceAccountToken"]) == ("lopd-deployer", True)
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError" and "nvidia.com/gpu" not in str(c["resources"])
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert job["spec"]["podFailurePolicy"]["rules"][1]["action"] == "FailJob"
    # the driver (lopd-deployer) may install every kind any stage renders
    rbac = [d for d in yaml.safe_load_all((REPO / "manifests" / "rbac.yaml").read_text()) if d]
    rules = next(o for o in rbac if o["kind"] == "Role")["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
               if "create" in rule["verbs"] and "delete" in rule["verbs"]}
    online = load_recipe(TINY, ["run_id=fx", "opd.mode=online", "kubernetes.teacher_server.pod_monitor=true"])
    kinds = {(o["apiVersion"], o["kind"]) for r in (recipe, online) for s in stages_of(r)
             for o in helm.objects(helm.render(stage_values(r, s), release_name("fx", s), "lopd"))}
    plural = {"Job": "jobs", "PyTorchJob": "pytorchjobs", "ConfigMap": "configmaps",
              "ServiceAccount": "serviceaccounts", "Service": "services", "Deployment": "deployments",
              "NetworkPolicy": "networkpolicies",
              "PodMonitor": "podmonitors"}
    need = {(api.split("/")[0] if "/" in api else "", plural[k]) for api, k in kinds}
    assert ("monitoring.coreos.com", "podmonitors") in need and need <= granted


def test_driver_runs_every_lightning_round_and_status_shows_rounds(cluster_of, tmp_path):
    """``opd.rounds: 2``: the driver deploys each round's precompute and opd as their own releases,
    in order, and `lopd status` has a row (with its release) for each round."""
    rp, cluster = cluster_of(load("run-no-training-operator"))
    uri = f"file://{tmp_path / 'store'}"
    store = open_store(uri)
    recipe = load_recipe(TINY, [o for o in FX if o != "--set"] + [f"store={uri}", "opd.rounds=2"])
    deployed: list[str] = []
    prog = drive(recipe, store, _publisher(store, tmp_path, deployed), workload_status_fn(cluster, "fx"),
                 lambda s: pytest.fail("nothing failed"), lambda s: None, poll=0, sleep=lambda s: None)
    assert deployed == ["sft-data", "sft", "precompute", "opd", "precompute-r2", "opd-r2", "eval"]
    assert prog["state"] == "succeeded"
    rows = {r["stage"]: r for r in json.loads(lopd_cli("status", "-r", TINY, *FX, "--set", f"store={uri}",
                                                       "--set", "opd.rounds=2", "--kubeconfig",
                                                       str(tmp_path / "kubeconfig-1"), "--json").stdout)}
    assert rows["opd-r2"]["published"] and rows["opd-r2"]["release"] == release_name("fx", "opd-r2")
    assert rows["precompute-r2"]["shards_total"] == recipe.precompute.shards
