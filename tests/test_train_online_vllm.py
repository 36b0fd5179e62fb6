"""vLLM in online OPD (lopd.train.online): weights pushed into a live engine, and the teacher as a
real vLLM server.

vLLM runs in subprocesses (its engine must start under ``if __name__ == "__main__"``): the push
scenario is this module run as a script, the server is vLLM's own OpenAI-compatible entrypoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lopd.train.online import OnlineError
from lopd.train.teachers import InProcessTeacher, ServerTeacher, TeacherError
from tests.helpers.cli import REPO

SEEDS = [11, 12, 13, 14]


def chat_prompts(model: Path, n: int = 4) -> list[list[int]]:
    from transformers import AutoTokenizer

    from lopd.data.chat import encode_prompt

    tok = AutoTokenizer.from_pretrained(model)
    return [encode_prompt(tok, [{"role": "user", "content": f"Compute {i}+{2 * i}+{i + 5}."}]) for i in range(n)]


def fixed_responses(model: Path, n: int = 4) -> list[list[int]]:
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, 5 + 3 * i).tolist() for i in range(n)]


def vllm_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **extra}


# --------------------------------------------------------------------------- push into a live engine


def push_scenario(w1: Path, w2: Path, out: Path) -> None:
    """Engine from W1: score and sample; push W2: again; push W1 back: again. Writes JSON."""
    from safetensors.torch import load_file

    from lopd.inference import load_backend
    from lopd.recipe import InferenceConfig, SamplingConfig
    from lopd.train.online import push_weights

    prompts, responses = chat_prompts(w1), fixed_responses(w1)
    sp = SamplingConfig(temperature=1.0, top_p=1.0, max_tokens=12)
    b = load_backend(w1, InferenceConfig(backend="vllm", max_model_len=128, max_num_seqs=4,
                                         gpu_memory_utilization=0.05))
    res = {}

    def probe(tag: str) -> None:
        comps = [c[0] for c in b.generate(prompts, sp, SEEDS)]
        res[tag] = {"score": [s.tolist() for s in b.score(prompts, responses)],
                    "tokens": [c.token_ids for c in comps], "logprobs": [c.logprobs for c in comps]}

    probe("w1")
    t = time.perf_counter()
    push_weights(b, load_file(str(w2 / "model.safetensors")))
    res["push_s"] = time.perf_counter() - t
    probe("w2")
    push_weights(b, load_file(str(w1 / "model.safetensors")))
    probe("w1_again")
    res["multiprocessing"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    partial = load_file(str(w2 / "model.safetensors"))
    partial.pop("model.norm.weight")
    bad = {**partial, "model.nonexistent.weight": next(iter(partial.values()))}
    for tag, weights in (("partial", partial), ("bad_name", bad)):
        try:
            push_weights(b, weights)
            res[tag] = None
        except OnlineError as e:
            res[tag] = str(e)
    b.close()
    out.write_text(json.dumps(res))


def processed_scenario(model: Path, out: Path) -> None:
    """A vLLM engine started with logprobs_mode="processed" samples at T=0.7, top-p 0.9. Writes JSON."""
    from lopd.inference import load_backend
    from lopd.recipe import InferenceConfig, SamplingConfig

    prompts = chat_prompts(model)
    b = load_backend(model, InferenceConfig(backend="vllm", max_model_len=128, max_num_seqs=4,
                                            gpu_memory_utilization=0.05), logprobs_mode="processed")
    comps = [c[0] for c in b.generate(prompts, SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=12), SEEDS)]
    b.close()
    out.write_text(json.dumps({"prompts": prompts, "tokens": [c.token_ids for c in comps],
                               "logprobs": [c.logprobs for c in comps]}))


@pytest.mark.slow
def test_vllm_processed_logprobs_are_the_sampling_distribution(opd_models, tmp_path):
    """vLLM's processed_logprobs of its sampled tokens equal log_softmax(logits / T) restricted to
    the top-p set and renormalised (the hf reference, an uncached full forward), fp32."""
    from tests.helpers.inference import sampling_logprobs

    student, _ = opd_models
    out = tmp_path / "processed.json"
    subprocess.run([sys.executable, __file__, "processed", str(student), str(out)], cwd=REPO, env=vllm_env(),
                   check=True, timeout=600, capture_output=True)
    res = json.loads(out.read_text())
    ref = sampling_logprobs(student, res["prompts"], res["tokens"], 0.7, 0.9)
    d = max_diff(res["logprobs"], ref)
    print(f"vllm processed log-probs vs reference: max|diff|={d:.2e}")
    assert d <= 5e-4, d  # seen: 7e-5 (vLLM fp32 on a CPU vs a float64 reference)
    raw = hf_logprobs(student, res["prompts"], res["tokens"])
    assert max_diff(res["logprobs"], raw) > 0.05  # not the raw log-probs


def hf_logprobs(model: Path, prompts: list[list[int]], responses: list[list[int]]) -> list[np.ndarray]:
    from lopd.inference import load_backend
    from lopd.recipe import InferenceConfig

    b = load_backend(model, InferenceConfig(backend="hf", max_model_len=128))
    try:
        return b.score(prompts, responses)
    finally:
        b.close()


def max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()) for x, y in
               zip(a, b, strict=True))


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """Two random Qwen3-MoE models (different seeds) sharing the tiny model's tokenizer."""
    from lopd.modelinit import init_model

    d = tmp_path_factory.mktemp("moe")
    return tuple(Path(init_model(d / f"m{seed}", arch="qwen3-moe", tokenizer=tiny_model, seed=seed))
                 for seed in (1, 2))


@pytest.mark.slow
@pytest.mark.parametrize("arch,multiprocessing", [("dense", "1"), ("moe", "0")])
def test_pushed_weights_replace_the_live_vllm_engine_weights(tmp_path, request, arch, multiprocessing):
    """An engine started from W1 gets W2 pushed: its scoring and its sampler's log-probs then equal
    the transformers model of W2 (fp32, atol 1e-4) and are far from W1's; pushing W1 back restores
    W1 exactly (same seeds → same tokens). Dense: the engine core and its worker run in their own
    processes (``VLLM_ENABLE_V1_MULTIPROCESSING=1``, vLLM's default on GPUs), so the weights cross
    process boundaries as on a cluster. MoE (Qwen3-MoE): in-process, the CPU default, where vLLM
    would skip re-packing the experts on an update."""
    w1, w2 = request.getfixturevalue("opd_models" if arch == "dense" else "moe_models")
    out = tmp_path / "push.json"
    proc = subprocess.run([sys.executable, "-m", "tests.test_train_online_vllm", "push", str(w1), str(w2), str(out)],
                          cwd=REPO, env=vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING=multiprocessing),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["multiprocessing"] == multiprocessing
    prompts, responses = chat_prompts(w1), fixed_responses(w1)
    ref1, ref2 = hf_logprobs(w1, prompts, responses), hf_logprobs(w2, prompts, responses)
    tol = 1e-4  # fp32 on both sides; observed ~1e-5 (different GEMM kernels: oneDNN vs torch)
    assert max_diff(r["w1"]["score"], ref1) < tol
    assert max_diff(r["w2"]["score"], ref2) < tol, "vLLM scores after the push are not W2's"
    assert max_diff(r["w2"]["score"], ref1) > 0.1, "the push left W1's weights in place"
    # the sampler itself runs W2: its log-probs of what it sampled are W2's log-probs of those tokens
    assert r["w2"]["tokens"] != r["w1"]["tokens"]
    assert max_diff(r["w2"]["logprobs"], hf_logprobs(w2, prompts, r["w2"]["tokens"])) < tol
    assert max_diff(r["w2"]["logprobs"], hf_logprobs(w1, prompts, r["w2"]["tokens"])) > 0.1
    # and back: the reload is exact (same kernels, same seeds → the same samples)
    assert r["w1_again"]["tokens"] == r["w1"]["tokens"]
    assert max_diff(r["w1_again"]["score"], r["w1"]["score"]) == 0.0
    assert max_diff(r["w1_again"]["logprobs"], r["w1"]["logprobs"]) == 0.0
    # a push that leaves a parameter stale, or names one the model does not have, is a one-line error
    assert r["partial"] and "\n" not in r["partial"] and "model.norm.weight" in r["partial"], r["partial"]
    assert r["bad_name"] and "\n" not in r["bad_name"] and "nonexistent" in r["bad_name"], r["bad_name"]
    print(f"push into a live vLLM engine ({arch}, multiprocessing={multiprocessing}): {r['push_s']:.3f} s, "
          f"max|vLLM - transformers| after the push: {max_diff(r['w2']['score'], ref2):.1e}; errors: "
          f"{r['partial']!r}, {r['bad_name']!r}")


# --------------------------------------------------------------------------- teacher as a vLLM server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher_server(opd_models, tmp_path_factory):
    """``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs) on the teacher,
    on a free loopback port; yields its URL."""
    _, teacher = opd_models
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher),
           "--served-model-name", "teacher", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "128", "--max-num-seqs", "8", "--enforce-eager", "--no-enable-chunked-prefill",
           "--disable-log-stats"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=vllm_env(), stdout=f, stderr=subprocess.STDOUT)
    url, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vLLM server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            if time.monotonic() - t0 > 300:
                raise AssertionError(f"vLLM server not ready after 300 s:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        print(f"vLLM server ready in {time.monotonic() - t0:.1f} s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_server_teacher_scores_equal_in_process_teacher(teacher_server, opd_models):
    """The teacher_url client against a real vLLM server: the same log-probs as the in-process
    teacher (transformers, packed and chunked) for every response token, fp32, atol 1e-4; a
    prompt longer than the server's context and a dead server are one-line errors."""
    _, teacher = opd_models
    prompts, responses = chat_prompts(teacher), fixed_responses(teacher)
    client = ServerTeacher(teacher_server)
    got = client.score(prompts, responses)
    assert client.model == "teacher"
    ref = InProcessTeacher(teacher).score(prompts, responses)
    assert [len(g) for g in got] == [len(r) for r in responses]
    assert all(g.dtype == np.float32 for g in got)
    assert max_diff(got, ref) < 1e-4, max_diff(got, ref)
    assert client.score([], []) == []

    with pytest.raises(TeacherError, match=r"opd\.online\.teacher_url: .*/v1/completions: HTTP 400"):
        client.score([prompts[0]], [responses[0] * 40])  # > --max-model-len 128: not retried
    with pytest.raises(TeacherError, match=r"teacher_url: http://127\.0\.0\.1:1/v1/models: .*after 1 retries"):
        ServerTeacher("http://127.0.0.1:1", timeout=5, retries=1, backoff_s=0.01).score(prompts, responses)


if __name__ == "__main__":
    if sys.argv[1] == "push":
        push_scenario(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    elif sys.argv[1] == "processed":
        processed_scenario(Path(sys.argv[2]), Path(sys.argv[3]))
