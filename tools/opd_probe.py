"""A fast OPD probe for research on the embedded default (not part of the product or the tests).

Trains a pipeline-made SFT student with lopd's own per-token OPD loss in plain PyTorch (one
update per batch, AdamW, no DeepSpeed, no vLLM) and reports held-out accuracy every few steps:
greedy, and with ``--sampled`` also temperature 0.6 (avg@2). Offline it reads the precomputed
rollouts; ``--online`` samples fresh ones from the current student (transformers) and has the
teacher score them. It is how the table "Looking for a regime where OPD lifts the student" in
docs/repro.md was made; each row takes 1-6 minutes on one core.

    python tools/opd_probe.py --workdir . --iw-cap 2 --lr 1e-4 --steps 60 --every 20 --sampled
    python tools/opd_probe.py --workdir . --online --lr 5e-5 --steps 40

``--workdir`` is a directory holding a finished tiny run (``runs/tiny/{sft,precompute,data}`` and
``runs/tiny-teacher/sft``, e.g. after ``make demo``). Prints one JSON line per evaluation.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lopd.train.losses import opd_loss_per_token

BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=".", help="directory with runs/tiny and runs/tiny-teacher")
    ap.add_argument("--student", default="runs/tiny/sft", help="student checkpoint, relative to --workdir")
    ap.add_argument("--rollouts", default="runs/tiny/precompute", help="precomputed rollouts, relative to --workdir")
    ap.add_argument("--teacher", default="runs/tiny-teacher/sft", help="teacher (scores online), relative to --workdir")
    ap.add_argument("--teacher-temperature", type=float, default=1.0,
                    help="online: score with the teacher's distribution at this temperature (not the paper's)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256, help="sequences per update")
    ap.add_argument("--iw-cap", type=float, default=0.0, help="truncated importance weights cap (0: off)")
    ap.add_argument("--kl-coef", type=float, default=0.0, help="KL-to-SFT penalty on the rollouts")
    ap.add_argument("--adv-floor", type=float, default=0.0, help="floor advantages at -X (0: off; not the paper's)")
    ap.add_argument("--online", action="store_true", help="fresh rollouts from the current student every step")
    ap.add_argument("--temperature", type=float, default=1.0, help="online sampling temperature")
    ap.add_argument("--untie", action="store_true", help="give the student its own LM head")
    ap.add_argument("--every", type=int, default=10, help="evaluate every N steps")
    ap.add_argument("--sampled", action="store_true", help="also evaluate at temperature 0.6 (avg@2)")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args()


def logprobs(model, pairs: list[tuple[list[int], list[int]]], temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-token log-probs of each response given its prompt (right-padded batch), of the
    model's distribution at ``temperature`` (log-softmax of logits / temperature)."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        att[i, :len(p) + len(r)] = 1
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float() / temperature, -1)
    return [lp[i, len(p) - 1:len(p) - 1 + len(r)].gather(-1, torch.tensor(r)[:, None])[:, 0]
            for i, (p, r) in enumerate(pairs)]


class Probe:
    def __init__(self, a: argparse.Namespace):
        w = Path(a.workdir)
        self.a = a
        self.tok = AutoTokenizer.from_pretrained(w / a.student)
        self.tok.padding_side = "left"
        self.student = AutoModelForCausalLM.from_pretrained(w / a.student)
        self.teacher = AutoModelForCausalLM.from_pretrained(w / a.teacher).eval()
        if a.untie:
            emb = self.student.get_input_embeddings().weight
            self.student.lm_head.weight = torch.nn.Parameter(emb.detach().clone())
            self.student.config.tie_word_embeddings = False
        parts = sorted((w / a.rollouts / "shards").glob("*/*.parquet"))
        self.rows = pa.concat_tables([pq.read_table(f) for f in parts]).to_pylist()
        self.bench = [json.loads(x) for x in open(w / "runs/tiny/data/arith.jsonl")]
        self.prompts = [json.loads(x)["messages"] for x in open(w / "runs/tiny/data/opd_prompts.jsonl")]
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")

    def chat(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def accuracy(self, sampled: bool) -> float:
        self.student.eval()
        torch.manual_seed(123)
        reps, correct = (2 if sampled else 1), 0
        for _ in range(reps):
            for i in range(0, len(self.bench), 100):
                batch = self.bench[i:i + 100]
                x = self.tok([self.chat([{"role": "user", "content": e["problem"]}]) for e in batch],
                             return_tensors="pt", padding=True)
                kw = dict(do_sample=True, temperature=0.6, top_p=0.95) if sampled else dict(do_sample=False)
                y = self.student.generate(**x, max_new_tokens=96, pad_token_id=self.tok.pad_token_id, **kw)
                for e, text in zip(batch, self.tok.batch_decode(y[:, x["input_ids"].shape[1]:],
                                                                skip_special_tokens=True), strict=True):
                    found = BOXED.findall(text)
                    correct += bool(found) and found[-1] == str(e["answer"])
        self.student.train()
        return round(correct / len(self.bench) / reps, 3)

    @torch.no_grad()
    def fresh_rollouts(self, n: int) -> list[dict]:
        self.student.eval()
        x = self.tok([self.chat(m) for m in random.sample(self.prompts, n)], return_tensors="pt", padding=True)
        y = self.student.generate(**x, max_new_tokens=96, do_sample=True, temperature=self.a.temperature,
                                  top_p=1.0, top_k=0, pad_token_id=self.tok.pad_token_id)
        pairs = []
        for i in range(n):
            prompt = x["input_ids"][i][x["attention_mask"][i].bool()].tolist()
            resp = y[i, x["input_ids"].shape[1]:].tolist()
            resp = resp[:resp.index(self.im_end) + 1] if self.im_end in resp else resp
            pairs.append((prompt, [t for t in resp if t != self.tok.pad_token_id] or [self.im_end]))
        scores = logprobs(self.teacher, pairs, self.a.teacher_temperature)
        self.student.train()
        return [dict(prompt_token_ids=p, response_token_ids=r, teacher_logprobs=s.tolist(), rollout_logprobs=None)
                for (p, r), s in zip(pairs, scores, strict=True)]

    def evaluate(self) -> float | tuple[float, float]:
        greedy = self.accuracy(False)
        return (greedy, self.accuracy(True)) if self.a.sampled else greedy


def main() -> None:
    a = args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    random.seed(0)
    p = Probe(a)
    opt = torch.optim.AdamW(p.student.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.1)
    order = random.sample(range(len(p.rows)), len(p.rows))
    print(json.dumps({"step": 0, "acc": p.evaluate()}), flush=True)
    t0, pos = time.time(), 0
    p.student.train()
    for step in range(1, a.steps + 1):
        if a.online:
            batch = p.fresh_rollouts(a.batch)
        else:
            if pos + a.batch > len(order):
                random.shuffle(order)
                pos = 0
            batch, pos = [p.rows[i] for i in order[pos:pos + a.batch]], pos + a.batch
        lp = torch.cat(logprobs(p.student, [(b["prompt_token_ids"], b["response_token_ids"]) for b in batch]))
        teacher = torch.tensor([x for b in batch for x in b["teacher_logprobs"]])
        rollout = None if a.online else torch.tensor([x for b in batch for x in b["rollout_logprobs"]])
        if a.adv_floor:
            teacher = torch.maximum(teacher, lp.detach() - a.adv_floor)
        loss, stats = opd_loss_per_token(lp, lp.detach(), teacher, rollout, iw_cap=a.iw_cap or None,
                                         kl_coef=a.kl_coef)
        opt.zero_grad()
        loss.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(p.student.parameters(), 1.0)
        opt.step()
        if step % a.every == 0 or step == a.steps:
            print(json.dumps({"step": step, "acc": p.evaluate(), "adv": round(stats["advantage"].mean().item(), 4),
                              "kl_to_sft": round(stats["kl_ref"].mean().item(), 4),
                              "grad_norm": round(grad_norm.item(), 3), "s": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
