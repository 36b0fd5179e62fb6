"""Standard (online) OPD: fresh rollouts of the current student each step, scored by a live teacher.

Per step: push the trainer's current weights into the sampler (an inference backend behind
:class:`lopd.inference.base.Backend`; vLLM reloads them layer by layer into its live engine,
as slime and verl do; the hf backend copies them into its parameters) → sample one rollout per
prompt of this rank's share of the step's prompts → the teacher scores every response token
(in-process with the chunked log-prob function, or a vLLM server's ``prompt_logprobs``) → the
same :func:`lopd.train.opd.opd_step` as offline mode.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from lopd import LopdError, stage
from lopd.data.chat import check_same_vocab, encode_prompt
from lopd.data.prompts import Prompt, load_prompts
from lopd.layout import stage_prefix
from lopd.lineage import check_teacher_consistency
from lopd.manifest import InputRef
from lopd.recipe import SamplingConfig
from lopd.train.data import OpdSample, global_batch_indices, rank_share
from lopd.train.engine import device
from lopd.train.losses import model_logprobs
from lopd.train.opd import split_minis
from lopd.train.packing import Seq, pack


class OnlineError(LopdError):
    """Online OPD cannot run as configured (no prompts, teacher server errors...)."""


# --------------------------------------------------------------------------- teachers


class InProcessTeacher:
    """The teacher as a transformers model in this process; packed, chunked log-probs."""

    def __init__(self, path: Path, chunk: int = 1024, budget: int = 8192):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if torch.cuda.is_available()
                                                          else torch.float32).to(device()).eval()
        self.chunk, self.budget = chunk, budget

    @torch.no_grad()
    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[np.ndarray]:
        seqs = []
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            labels = np.zeros(len(p) + len(r), bool)
            labels[len(p):] = True
            seqs.append(Seq(np.asarray(p + r, np.int64), labels, i))
        flat = []
        for mb in pack(seqs, self.budget):
            m = mb.to(device())
            lp, _ = model_logprobs(self.model, m.input_ids, m.position_ids, m.targets, m.select, None, self.chunk)
            flat.append(lp.float().cpu().numpy())
        allp = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        return list(np.split(allp, np.cumsum([len(r) for r in responses])[:-1]))

    def close(self) -> None:
        self.model = None


class ServerTeacher:
    """The teacher as a vLLM OpenAI-compatible server (``vllm serve`` /
    ``python -m vllm.entrypoints.openai.api_server``): one ``/v1/completions`` request per call
    with every prompt+response as a list of token ids, ``prompt_logprobs=0`` and ``max_tokens=1``;
    vLLM answers log p(token_t | tokens_<t) of every prompt token (the same numbers as its
    in-process scoring), of which the response part is kept."""

    def __init__(self, url: str, model: str | None = None, timeout: float = 600.0):
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout

    def _call(self, path: str, body: dict | None = None):
        req = urllib.request.Request(f"{self.url}{path}", None if body is None else json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # the server's own one-line reason (too long, bad ids...)
            try:
                err = json.loads(e.read() or b"{}")
                msg = err.get("error", {}).get("message") if isinstance(err.get("error"), dict) else err
            except ValueError:
                msg = None
            raise OnlineError(f"opd.online.teacher_url: {self.url}{path}: HTTP {e.code}: {msg or e.reason}") from None
        except (OSError, ValueError) as e:
            raise OnlineError(f"opd.online.teacher_url: {self.url}{path}: {e}") from None

    def _model(self) -> str:
        if self.model is None:
            data = self._call("/v1/models").get("data") or []
            if not data:
                raise OnlineError(f"opd.online.teacher_url: {self.url}/v1/models lists no model")
            self.model = data[0]["id"]
        return self.model

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[np.ndarray]:
        if not prompts:
            return []
        body = {"model": self._model(), "prompt": [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)],
                "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0}
        choices = sorted(self._call("/v1/completions", body).get("choices") or [], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise OnlineError(f"opd.online.teacher_url: {self.url} answered {len(choices)} choices for "
                              f"{len(prompts)} prompts")
        out = []
        for c, p, r in zip(choices, prompts, responses, strict=True):
            entries = (c.get("prompt_logprobs") or [])[len(p):]
            if len(entries) != len(r):
                raise OnlineError(f"opd.online.teacher_url: {self.url} returned no prompt_logprobs for choice "
                                  f"{c['index']} (is it a vLLM server?)")
            out.append(np.array([e[str(t)]["logprob"] for e, t in zip(entries, r, strict=True)], np.float32))
        return out

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- weights


def gather_weights(engine) -> dict[str, torch.Tensor]:
    """Full weights of the trained HF model by name (collective under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.lm.named_parameters():
        v = safe_get_full_fp32_param(p)
        out[name] = (v if v is not None else p.data).detach()
    return out


def push_weights(backend, weights: dict[str, torch.Tensor]) -> None:
    """Load the trainer's weights into a live sampler: the vLLM engine through its layerwise
    reload (:meth:`lopd.inference.vllm_backend.VLLMBackend.update_weights`, prefix cache reset),
    the hf backend by copying into its parameters."""
    update = getattr(backend, "update_weights", None)
    if update is not None:
        try:
            update(weights)
        except Exception as e:  # vLLM re-raises a worker's error as a bare Exception across processes
            why = (str(e).splitlines() or [""])[0]
            why = why if len(why) <= 300 else why[:300] + "…"
            raise OnlineError(f"opd.online.inference: cannot load the trainer's weights into the live "
                              f"{type(backend).__name__}: {type(e).__name__}: {why}") from None
        return
    model = getattr(backend, "model", None)
    if model is None:
        raise OnlineError(f"cannot push weights into {type(backend).__name__} (no update_weights or .model)")
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in weights.items():
            sd[k].copy_(v.to(sd[k].dtype))


# --------------------------------------------------------------------------- source


class OnlineSource:
    """Fresh rollouts per step for :func:`lopd.train.opd.opd_step` (mirrors
    :class:`lopd.train.offline.OfflineSource`)."""

    plot_keys: list[str] = []
    summary: dict = {}

    def __init__(self, run, student, teacher, prompts: list[Prompt], lineage: dict, inputs: dict):
        self.run, self.student, self.teacher_model = run, student, teacher
        self.prompts, self.lineage, self.inputs = prompts, lineage, inputs
        self.cfg = run.section.online
        self.sampler = self.teacher = None
        self.timings: dict[str, float] = {}

    @classmethod
    def from_run(cls, run, student=None) -> OnlineSource:
        """Resolve the student (SFT checkpoint), the teacher (consistency-checked) and the prompts;
        with ``student`` given (the offline gradient diagnostic) no prompts are needed."""
        recipe, cfg = run.recipe, run.section
        ref = cfg.student or run.store.url(stage_prefix(recipe.run_id, "sft"))
        student = student or stage.resolve_model(ref, "opd.student")
        teacher = stage.resolve_model(recipe.models.teacher, "models.teacher.uri")
        consistency = check_teacher_consistency(student.lineage.get("teacher_fingerprint"), teacher.fingerprint,
                                                recipe.allow_inconsistent_teacher)
        src = cfg.online.prompts or (recipe.precompute.prompts if recipe.precompute else None)
        if cfg.mode == "offline":
            return cls(run, student, teacher, [], {}, {})
        if cfg.kl_coef > 0:
            raise OnlineError("opd.kl_coef: the KL-to-SFT penalty needs the SFT policy's log-probs of fresh "
                              "rollouts, which online mode does not compute; use kl_coef: 0 online")
        if not src:
            raise OnlineError("opd.online.prompts: online mode needs prompts (or precompute.prompts)")
        prompts = sorted(load_prompts(src), key=lambda p: p.prompt_id)
        inputs = {"student": student.input_ref(), "teacher": teacher.input_ref(), "prompts": InputRef(uri=src)}
        lineage = {**consistency, "student_fingerprint": student.fingerprint, "mode": "online"}
        return cls(run, student, teacher, prompts, lineage, inputs)

    def attach(self, run) -> None:
        """Start the sampler and the teacher (after the engine exists: the sampler gets its weights)."""
        from transformers import AutoTokenizer

        from lopd.inference import load_backend

        self.tokenizer = AutoTokenizer.from_pretrained(self.student.path)
        check_same_vocab(AutoTokenizer.from_pretrained(self.teacher_model.path), self.tokenizer, "teacher",
                         "student")
        self.sampler = load_backend(self.student.path, self.cfg.inference, seed=self.cfg.sampling.seed)
        self.teacher = (ServerTeacher(self.cfg.teacher_url) if self.cfg.teacher_url
                        else InProcessTeacher(self.teacher_model.path, run.section.logprob_chunk_tokens,
                                              run.section.train.micro_batch_tokens))

    def rollouts(self, keys: list[str], ids: list[list[int]], step: int, sync: bool = True) -> list[OpdSample]:
        """Current-policy rollouts (one per tokenised prompt) with teacher log-probs."""
        t0 = time.perf_counter()
        if sync:
            push_weights(self.sampler, gather_weights(self.run.engine))
        t1 = time.perf_counter()
        sp: SamplingConfig = self.cfg.sampling.model_copy(update={"n": 1})
        seeds = [stage.prompt_seed(sp.seed * 1_000_003 + step, k) for k in keys]
        comps = [c[0] for c in self.sampler.generate(ids, sp, seeds)] if ids else []
        keep = [(k, i, c) for k, i, c in zip(keys, ids, comps, strict=True) if c.token_ids]
        t2 = time.perf_counter()
        scores = self.teacher.score([i for _, i, _ in keep], [c.token_ids for _, _, c in keep]) if keep else []
        self.timings = {"sync_s": t1 - t0, "sample_s": t2 - t1, "score_s": time.perf_counter() - t2}
        return [OpdSample(k, 0, np.asarray(i, np.int64), np.asarray(c.token_ids, np.int64),
                          np.asarray(sc, np.float32), np.asarray(c.logprobs, np.float32))
                for (k, i, c), sc in zip(keep, scores, strict=True)]

    def step_prompts(self, step: int) -> list[Prompt]:
        t = self.run.section.train
        idx = global_batch_indices(len(self.prompts), step, t.global_batch, t.seed)
        return rank_share([self.prompts[i] for i in idx], self.run.rank, self.run.world)

    def batch(self, step: int) -> list[OpdSample]:
        prompts = self.step_prompts(step)
        sp = self.cfg.sampling
        ids = [encode_prompt(self.tokenizer, p.messages, sp.enable_thinking) for p in prompts]
        return self.rollouts([p.prompt_id for p in prompts], ids, step)

    def minibatches(self, step: int) -> list[list[OpdSample]]:
        """Fresh rollouts of this rank's share of step ``step``'s prompts, split into the PPO
        mini-batches locally (each rank sampled its own share)."""
        return split_minis(self.batch(step), self.run.section.mini_batches, 0, 1)

    def before_step(self, step: int, minis: list[list[OpdSample]]) -> dict[str, float]:
        """Metrics measured before the update: the sampling and scoring times of this batch."""
        return dict(self.timings)

    def close(self) -> None:
        for x in (self.sampler, self.teacher):
            if x is not None:
                x.close()
