"""The teacher of online OPD: a transformers model in this process, or a vLLM server.

Both score ``log p_teacher(token_t | tokens_<t)`` of every response token at temperature 1 (the
advantage's teacher term). The server client retries what a restarting or overloaded replica
answers (connection refused or reset, timeouts, HTTP 429 and 5xx) with exponential backoff, so a
rolling restart of the teacher Deployment costs a pause, not the run; a 4xx other than 429 is the
request's fault and fails at once with the server's own message.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from lopd import LopdError
from lopd.progress import log
from lopd.train.engine import device
from lopd.train.losses import model_logprobs
from lopd.train.packing import Seq, pack

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class TeacherError(LopdError):
    """The teacher cannot score (server unreachable after retries, a refused request, bad answers)."""


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
    in-process scoring), of which the response part is kept.

    Transient failures are retried ``retries`` times, waiting ``backoff_s · 2^k`` (capped at
    ``max_backoff_s``) before retry ``k``; each retry logs one ``teacher_retry`` line.
    """

    def __init__(self, url: str, model: str | None = None, timeout: float = 600.0, retries: int = 6,
                 backoff_s: float = 1.0, max_backoff_s: float = 30.0):
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s

    def _once(self, path: str, body: dict | None) -> dict:
        req = urllib.request.Request(f"{self.url}{path}", None if body is None else json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.load(r)

    def _call(self, path: str, body: dict | None = None) -> dict:
        where = f"opd.online.teacher_url: {self.url}{path}"
        for attempt in range(self.retries + 1):
            try:
                return self._once(path, body)
            except urllib.error.HTTPError as e:
                if e.code not in RETRY_STATUS or attempt == self.retries:
                    raise TeacherError(f"{where}: HTTP {e.code}: {_server_message(e)}") from None
                reason = f"HTTP {e.code}"
            except ValueError as e:  # not JSON: a proxy's error page, a truncated answer
                raise TeacherError(f"{where}: {e}") from None
            except OSError as e:  # refused, reset, timed out, DNS
                if attempt == self.retries:
                    raise TeacherError(f"{where}: {e} (after {self.retries} retries)") from None
                reason = str(e)
            wait = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
            log("teacher_retry", url=f"{self.url}{path}", attempt=attempt + 1, of=self.retries, wait_s=wait,
                reason=reason)
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _model(self) -> str:
        if self.model is None:
            data = self._call("/v1/models").get("data") or []
            if not data:
                raise TeacherError(f"opd.online.teacher_url: {self.url}/v1/models lists no model")
            self.model = data[0]["id"]
        return self.model

    def score(self, prompts: list[list[int]], responses: list[list[int]]) -> list[np.ndarray]:
        if not prompts:
            return []
        body = {"model": self._model(), "prompt": [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)],
                "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0}
        choices = sorted(self._call("/v1/completions", body).get("choices") or [], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise TeacherError(f"opd.online.teacher_url: {self.url} answered {len(choices)} choices for "
                               f"{len(prompts)} prompts")
        out = []
        for c, p, r in zip(choices, prompts, responses, strict=True):
            entries = (c.get("prompt_logprobs") or [])[len(p):]
            if len(entries) != len(r):
                raise TeacherError(f"opd.online.teacher_url: {self.url} returned no prompt_logprobs for choice "
                                   f"{c['index']} (is it a vLLM server?)")
            out.append(np.array([e[str(t)]["logprob"] for e, t in zip(entries, r, strict=True)], np.float32))
        return out

    def close(self) -> None:
        pass


def _server_message(e: urllib.error.HTTPError) -> str:
    """The server's own one-line reason (too long, bad ids...) or the HTTP reason phrase."""
    try:
        err = json.loads(e.read() or b"{}")
        msg = err.get("error", {}).get("message") if isinstance(err.get("error"), dict) else err
    except (ValueError, OSError):
        msg = None
    return str(msg or e.reason)
