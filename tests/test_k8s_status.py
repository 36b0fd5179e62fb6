"""`lopd status`, `lopd logs` and `lopd pipeline --backend k8s` against recorded API responses.

No Kubernetes cluster runs here: tests/fixtures/k8s/*.json (see its README) are served by a
loopback HTTP server to the real kubernetes client, with label selectors and tailLines applied.
The store side (shard manifests done/total) is a real file store written with lopd.manifest.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from lopd.k8s.status import format_table, workload_state
from lopd.layout import shard_prefix, stage_prefix
from lopd.manifest import finalize_shards, publish
from lopd.store import open_store
from tests.helpers.cli import REPO, lopd_cli

FIXTURES = REPO / "tests" / "fixtures" / "k8s"
TINY = str(REPO / "jobs" / "recipes" / "tiny.yaml")
FX = ["--set", "run_id=fx", "--set", "sft_data.shards=3", "--set", "precompute.shards=4",
      "--set", "sft.resources.nodes=2"]


def _matches(labels: dict, selector: str | None) -> bool:
    for term in filter(None, (selector or "").split(",")):
        k, v = term.split("=", 1)
        if labels.get(k) != v:
            return False
    return True


class Replay:
    """Serves one fixture scenario as the Kubernetes API would."""

    def __init__(self, scenario: dict):
        self.scenario = scenario
        self.requests: list[str] = []
        replay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, code: int, body, ctype="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                url = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(url.query).items()}
                replay.requests.append(self.path)
                responses = replay.scenario["responses"]
                if url.path.endswith("/log"):
                    name = url.path.split("/")[-2]
                    pods = responses[f"/api/v1/namespaces/{replay.scenario['namespace']}/pods"]["items"]
                    pod = next((p for p in pods if p["metadata"]["name"] == name), None)
                    if pod is None:
                        return self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound",
                                                "message": f'pods "{name}" not found', "code": 404})
                    cname = pod["spec"]["containers"][0]["name"]
                    if q.get("container", cname) != cname:
                        return self._send(400, {"kind": "Status", "status": "Failure", "reason": "BadRequest",
                                                "message": f"container {q['container']} is not valid for pod {name}",
                                                "code": 400})
                    text = replay.scenario["logs"].get(name, "")
                    if "tailLines" in q:
                        text = "".join(text.splitlines(keepends=True)[-int(q["tailLines"]):])
                    return self._send(200, text, "text/plain")
                if url.path not in responses:
                    return self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                                            "message": "the server could not find the requested resource"})
                body = responses[url.path]
                if body is None:
                    return self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                                            "message": "the server could not find the requested resource"})
                items = [i for i in body["items"] if _matches(i["metadata"].get("labels", {}), q.get("labelSelector"))]
                return self._send(200, {**body, "items": items})

            def do_DELETE(self):  # a Job / PyTorchJob / Deployment by name: gone from its list
                url = urlparse(self.path)
                replay.requests.append(f"DELETE {url.path}")
                collection, name = url.path.rsplit("/", 1)
                body = replay.scenario["responses"].get(collection) or {"items": []}
                keep = [i for i in body["items"] if i["metadata"]["name"] != name]
                if len(keep) == len(body["items"]):
                    return self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                                            "message": f'"{name}" not found'})
                body["items"] = keep
                return self._send(200, {"kind": "Status", "status": "Success", "code": 200})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        host, port = self.server.server_address[:2]
        return write_kubeconfig(path, f"http://{host}:{port}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fixture",
        "clusters": [{"name": "fixture", "cluster": {"server": server}}],
        "users": [{"name": "fixture", "user": {"token": "recorded"}}],
        "contexts": [{"name": "fixture", "context": {"cluster": "fixture", "user": "fixture"}}],
    }))
    return path


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def replay(request, tmp_path):
    rp = Replay(load(request.param))
    rp.kubecfg = str(rp.kubeconfig(tmp_path / "kubeconfig"))
    yield rp
    rp.close()


def _publish(store, prefix, tmp_path, stage, **kw):
    d = tmp_path / "art" / prefix
    d.mkdir(parents=True, exist_ok=True)
    (d / "data.txt").write_text(prefix)
    publish(store, prefix, d, stage=stage, run_id="fx", **kw)


@pytest.fixture
def midway_store(tmp_path) -> str:
    """sft-data published (3 shards), sft published, precompute shards 0 and 1 of 4 done."""
    uri = f"file://{tmp_path / 'store'}"
    store = open_store(uri)
    sd = stage_prefix("fx", "sft-data")
    for i in range(3):
        _publish(store, shard_prefix(sd, i, 3), tmp_path, "sft-data", shard={"index": i, "count": 3})
    assert finalize_shards(store, sd, 3) is not None
    _publish(store, stage_prefix("fx", "sft"), tmp_path, "sft")
    pc = stage_prefix("fx", "precompute")
    for i in (0, 1):
        _publish(store, shard_prefix(pc, i, 4), tmp_path, "precompute", shard={"index": i, "count": 4})
    return uri


def status_json(replay, store: str, *extra: str) -> dict:
    out = lopd_cli("status", "-r", TINY, *FX, "--set", f"store={store}", "--kubeconfig", replay.kubecfg,
                   "--json", *extra).stdout
    return {row["stage"]: row for row in json.loads(out)}


# --------------------------------------------------------------------------- phases


@pytest.mark.parametrize("case", load("workload-phases")["cases"],
                         ids=lambda c: f"{c['object']['kind']}-{c['expect'][0]}")
def test_workload_state_each_phase(case):
    state, detail = workload_state(case["object"])
    assert state == case["expect"][0]
    assert case["expect"][1] in detail


# --------------------------------------------------------------------------- status


@pytest.mark.parametrize("replay", ["run-midway"], indirect=True)
def test_status_midway(replay, midway_store):
    rows = status_json(replay, midway_store)
    assert list(rows) == ["sft-data", "sft", "precompute", "opd", "eval"]
    sd, sft, pc, opd, ev = (rows[s] for s in rows)
    assert (sd["kind"], sd["state"], sd["pods"], sd["shards_done"], sd["shards_total"], sd["published"]) == \
        ("Job", "Succeeded", {"Succeeded": 3}, 3, 3, True)
    assert (sft["kind"], sft["state"], sft["published"], sft["shards_done"]) == ("PyTorchJob", "Succeeded", True, 1)
    assert "Master succeeded=1" in sft["detail"]
    assert (pc["kind"], pc["state"], pc["shards_done"], pc["shards_total"], pc["published"]) == \
        ("Job", "Running", 2, 4, False)
    assert pc["pods"] == {"Failed": 1, "Running": 2, "Succeeded": 2}
    assert pc["failed_pods"] == ["lopd-fx-precompute-3-j7k8l (shard 3): OOMKilled (exit 137)"]
    assert "2/4 completed, 2 active, 1 failed" in pc["detail"]
    assert opd["state"] == ev["state"] == "NotDeployed" and opd["pods"] == {}
    # the client asked by the run's label, as `kubectl get -l` would
    assert any("labelSelector=lopd.io%2Frun%3Dfx" in r for r in replay.requests)


@pytest.mark.parametrize("replay", ["run-midway"], indirect=True)
def test_status_table(replay, midway_store):
    out = lopd_cli("status", "-r", TINY, *FX, "--set", f"store={midway_store}", "--kubeconfig", replay.kubecfg).stdout
    lines = out.splitlines()
    assert lines[0].startswith("run fx  store file://") and "namespace lopd" in lines[0]
    assert lines[1].split() == ["STAGE", "KIND", "STATE", "PODS", "SHARDS", "OUTPUT", "DETAIL"]
    pc = next(line for line in lines if line.startswith("precompute"))
    assert "Running" in pc and "2/4" in pc and "1 failed, 2 running, 2 succeeded" in pc
    assert "  ! precompute: lopd-fx-precompute-3-j7k8l (shard 3): OOMKilled (exit 137)" in lines
    assert next(line for line in lines if line.startswith("sft-data")).split()[5] == "3/3"


@pytest.mark.parametrize("replay", ["run-failing"], indirect=True)
def test_status_failures(replay, tmp_path):
    rows = status_json(replay, f"file://{tmp_path / 'empty'}")
    sd, sft, pc, opd, ev = (rows[s] for s in ("sft-data", "sft", "precompute", "opd", "eval"))
    assert sd["state"] == "Failed" and "PodFailurePolicy" in sd["detail"] and "exit code 2" in sd["detail"]
    assert any("(shard 1): Error (exit 2): error: recipe error: sft_data.prompts" in p for p in sd["failed_pods"])
    assert sft["state"] == "Restarting" and "1 Worker replica(s) failed" in sft["detail"]
    assert sft["failed_pods"] == [
        'lopd-fx-sft-worker-0: ImagePullBackOff: Back-off pulling image "ghcr.io/lopd/lopd:0.1.0"']
    assert sft["pods"] == {"Pending": 1, "Running": 1}
    assert pc["state"] == "Suspended" and "Kueue" in pc["detail"] and pc["pods"] == {}
    assert opd["state"] == "Running" and opd["pods"] == {"Pending": 1}  # Job active, its pod unschedulable
    assert opd["failed_pods"][0].startswith("lopd-fx-opd-x7c9v: Unschedulable: 0/12 nodes are available: "
                                            "4 Insufficient nvidia.com/gpu")
    assert ev["state"] == "Failed" and "DeadlineExceeded" in ev["detail"]
    assert sorted(ev["failed_pods"]) == [
        "lopd-fx-eval-0-b5n7m (shard 0): Error (exit 137)",
        "lopd-fx-eval-0-c2v4x (shard 0): Evicted: The node was low on resource: ephemeral-storage."]
    assert all(not r["published"] and r["shards_done"] == 0 for r in rows.values())


@pytest.mark.parametrize("replay", ["run-no-training-operator"], indirect=True)
def test_status_without_training_operator(replay, midway_store):
    rows = status_json(replay, midway_store)
    assert rows["sft"]["state"] == "Published" and rows["sft-data"]["state"] == "Published"  # cleaned up by TTL
    assert rows["precompute"]["state"] == "NotDeployed" and rows["precompute"]["shards_done"] == 2
    assert any("/pytorchjobs" in r for r in replay.requests)  # asked, got 404, carried on


def test_status_store_only(midway_store):
    out = lopd_cli("status", "-r", TINY, *FX, "--set", f"store={midway_store}", "--store-only").stdout
    assert "(store only)" in out
    pc = next(line for line in out.splitlines() if line.startswith("precompute"))
    assert pc.split()[1:4] == ["-", "-", "-"] and "2/4" in pc


def test_status_unreachable_and_unconfigured(tmp_path):
    cfg = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")  # nothing listens on port 9
    bad = lopd_cli("status", "-r", TINY, "--kubeconfig", str(cfg), check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("error: cannot reach the Kubernetes API at http://127.0.0.1:9 (list jobs)")
    none = lopd_cli("status", "-r", TINY, check=False,
                    env={"KUBECONFIG": str(tmp_path / "missing"), "HOME": str(tmp_path)})
    assert none.returncode == 2 and none.stderr.startswith("error: no Kubernetes configuration")


def test_format_table_lists_problem_pods():
    from lopd.k8s.status import StageStatus

    table = format_table([StageStatus("sft", "lopd-x-sft", "Job", "Failed", "boom", {"Failed": 1},
                                      ["p: OOMKilled (exit 137)"], 0, 1, False)])
    assert table.splitlines()[-1] == "  ! sft: p: OOMKilled (exit 137)"


# --------------------------------------------------------------------------- logs


@pytest.mark.parametrize("replay", ["run-midway"], indirect=True)
def test_logs_in_shard_order(replay):
    out = lopd_cli("logs", "precompute", "-r", TINY, *FX, "--kubeconfig", replay.kubecfg).stdout
    headers = [line for line in out.splitlines() if line.startswith("==> ")]
    assert headers == [
        "==> lopd-fx-precompute-0-a1b2c [shard 0] (Succeeded) <==",
        "==> lopd-fx-precompute-1-d3e4f [shard 1] (Succeeded) <==",
        "==> lopd-fx-precompute-2-g5h6i [shard 2] (Running) <==",
        "==> lopd-fx-precompute-3-j7k8l [shard 3] (Failed) <==",
        "==> lopd-fx-precompute-3-m9n0p [shard 3] (Running) <==",
    ]
    assert '"event": "resume", "from_part": 2' in out and "Killed" in out


@pytest.mark.parametrize("replay", ["run-midway"], indirect=True)
def test_logs_shard_tail_follow(replay):
    one = lopd_cli("logs", "precompute", "-r", TINY, *FX, "--kubeconfig", replay.kubecfg, "--shard", "2",
                   "--tail", "1").stdout.splitlines()
    assert one == ["==> lopd-fx-precompute-2-g5h6i [shard 2] (Running) <==",
                   '{"t": 1763633300.0, "event": "part", "done": 3, "total": 8}']
    assert any("tailLines=1" in r and "container=lopd" in r for r in replay.requests)
    fol = lopd_cli("logs", "sft", "-r", TINY, *FX, "--kubeconfig", replay.kubecfg, "--follow").stdout.splitlines()
    # both pods (master and worker) followed at once; the worker has no log lines
    assert fol == ["[lopd-fx-sft-master-0] [rank0] step 200/200 loss 0.412",
                   "[lopd-fx-sft-master-0] [rank0] published runs/fx/sft"]
    followed = [r for r in replay.requests if "follow=True" in r or "follow=true" in r]
    assert len(followed) == 2 and all("container=pytorch" in r for r in followed), replay.requests


@pytest.mark.parametrize("replay", ["run-midway"], indirect=True)
def test_logs_no_pods_is_one_line(replay):
    r = lopd_cli("logs", "opd", "-r", TINY, *FX, "--kubeconfig", replay.kubecfg, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: no pods for stage opd of run fx in namespace lopd")


# --------------------------------------------------------------------------- pipeline


def test_pipeline_plan_skips_published(midway_store):
    out = lopd_cli("pipeline", "--backend", "k8s", "--dry-run", "-r", TINY, *FX,
                   "--set", f"store={midway_store}").stdout.splitlines()
    assert out == ["skip sft-data: already published", "skip sft: already published",
                   "deploy precompute after sft", "deploy opd after precompute", "deploy eval after opd"]


def test_pipeline_online_opd_reads_sft_and_local_backend_errors(tmp_path):
    out = lopd_cli("pipeline", "--backend", "k8s", "--dry-run", "-r", TINY, "--set", "opd.mode=online",
                   "--set", f"store=file://{tmp_path}").stdout
    assert "deploy opd after sft\n" in out
    # the local backend (the default) has no dry run, and a bad recipe stops it before any work
    local = lopd_cli("pipeline", "-r", TINY, "--dry-run", check=False)
    assert local.returncode == 2 and "--dry-run applies to --backend k8s" in local.stderr
    bad = lopd_cli("pipeline", "-r", TINY, "--set", "opd.nope=1", "--set", f"store=file://{tmp_path}", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: recipe error: opd.nope: unknown key"
    assert not any(tmp_path.iterdir())


def test_pipeline_waits_for_inputs_and_stops_on_failure(tmp_path):
    """run_pipeline against a real store: deploys only once inputs publish; a failed input aborts."""
    from lopd.k8s import K8sError
    from lopd.k8s.pipeline import run_pipeline
    from lopd.recipe import load_recipe

    r = load_recipe(TINY, ["run_id=fx", f"store=file://{tmp_path / 's'}"])
    store = open_store(r.store)
    deployed, log = [], []

    def deploy(stage):  # the real one runs helm; here the "cluster" publishes the stage's output at once
        deployed.append(stage)
        _publish(store, stage_prefix("fx", stage), tmp_path, stage)
        return "ok"

    run_pipeline(r, store, deploy, lambda s: None, log.append, poll=0.01)
    assert deployed == ["sft-data", "sft", "precompute", "opd", "eval"]
    # second run: everything published, nothing deployed
    deployed.clear()
    run_pipeline(r, open_store(f"file://{tmp_path / 's'}"), deploy, lambda s: None, log.append, poll=0.01)
    assert deployed == []

    r2 = load_recipe(TINY, ["run_id=fx", f"store=file://{tmp_path / 's2'}"])
    with pytest.raises(K8sError, match="stage sft-data failed: BackoffLimitExceeded"):
        run_pipeline(r2, open_store(r2.store), lambda s: "ok", lambda s: ("Failed", "BackoffLimitExceeded"),
                     log.append, poll=0.01)


@pytest.mark.parametrize("replay", ["run-failing"], indirect=True)
def test_deploy_wait_and_pipeline_status_follow_the_cluster(replay):
    """What `lopd deploy --wait` and the pipeline poll: the newest workload of a stage, via the client."""
    from lopd.k8s import K8sError
    from lopd.k8s.cluster import Cluster
    from lopd.k8s.pipeline import wait_stage, workload_status_fn
    from lopd.recipe import load_recipe

    r = load_recipe(TINY, ["run_id=fx"])
    cluster = Cluster("lopd", kubeconfig=replay.kubecfg)
    status_of = workload_status_fn(cluster, "fx")
    assert status_of("precompute")[0] == "Suspended" and status_of("sft")[0] == "Restarting"
    with pytest.raises(K8sError, match=r"stage eval failed: .*DeadlineExceeded.*lopd logs eval"):
        wait_stage(cluster, r, "eval", poll=0.01, timeout=5, echo=print)
    with pytest.raises(K8sError, match="timed out after 0s waiting for stage precompute"):
        wait_stage(cluster, r, "precompute", poll=0.01, timeout=0, echo=print)


@pytest.mark.parametrize("replay", ["run-midway"], indirect=True)
def test_deploy_wait_returns_on_success(replay):
    from lopd.k8s.cluster import Cluster
    from lopd.k8s.pipeline import wait_stage
    from lopd.recipe import load_recipe

    wait_stage(Cluster("lopd", kubeconfig=replay.kubecfg), load_recipe(TINY, ["run_id=fx"]), "sft-data", poll=0.01,
               timeout=5, echo=print)
