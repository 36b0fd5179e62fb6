"""A fast OPD probe for research on the embedded default (not part of the product or the tests).

Trains a pipeline-made SFT student with lopd's own per-token OPD loss in plain PyTorch (one
update per batch, AdamW, no DeepSpeed, no vLLM) and reports held-out accuracy every few steps:
greedy, and with ``--sampled`` also temperature 0.6 (avg@2). Offline it reads the precomputed
rollouts; ``--online`` samples fresh ones from the current student (transformers) and has the
teacher score them. ``--objective full`` (diagnostic, not the paper's) trains on the exact
reverse KL over the whole vocabulary at each position instead of the sampled token's
advantage (``--topk K``: the teacher's top K tokens plus one bucket); ``--objective sft`` is the
control, the same updates on the teacher's SFT answers. It is how the tables "Looking for a
regime where OPD lifts the student" in docs/repro.md were made; each row takes 1-10 minutes on
one core.

    python tools/opd_probe.py --workdir . --iw-cap 2 --lr 1e-4 --steps 60 --every 20 --sampled
    python tools/opd_probe.py --workdir . --online --lr 5e-5 --steps 40
    python tools/opd_probe.py --workdir . --objective full --topk 4 --lr 3e-4 --warmup 10 --sampled
    python tools/opd_probe.py --workdir . --objective sft --lr 3e-4 --warmup 10 --sampled --save /tmp/s

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

from lopd.train.data import encode_sft_row
from lopd.train.losses import opd_loss_per_token

MICRO = 256   # sequences per forward pass (generation, scoring, gradient accumulation)
BOXED = re.compile(r"\\boxed\{(-?\d+)\}")


def args(argv: list[str] | None = None) -> argparse.Namespace:
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
    ap.add_argument("--warmup", type=int, default=0, help="linear lr warm-up over this many steps")
    ap.add_argument("--sft-data", default="runs/tiny/sft-data", help="--objective sft: the teacher's answers")
    ap.add_argument("--objective", choices=["sampled", "full", "sft"], default="sampled",
                    help="'sampled' = lopd's per-token loss on the sampled token (the paper's); 'full' = "
                         "the exact reverse KL over the whole vocabulary at each visited position (a diagnostic: "
                         "no sampling noise in the per-position signal; not the paper's); 'sft' = the control: the "
                         "same updates spent on more SFT on --sft-data")
    ap.add_argument("--topk", type=int, default=0,
                    help="--objective full: keep only the teacher's top-K tokens per position, the rest as one "
                         "bucket (the KL over K+1 outcomes; what storing top-K log-probs allows; 0: all)")
    ap.add_argument("--temperature", type=float, default=1.0, help="online sampling temperature")
    ap.add_argument("--untie", action="store_true", help="give the student its own LM head")
    ap.add_argument("--every", type=int, default=10, help="evaluate every N steps")
    ap.add_argument("--sampled", action="store_true", help="also evaluate at temperature 0.6 (avg@2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default="", help="save the trained student (HF format) to this directory at the end")
    a = ap.parse_args(argv)
    if a.objective == "sft" and a.online:
        ap.error("--objective sft trains on the teacher's answers: it has no --online mode")
    if a.topk and a.objective != "full":
        ap.error("--topk applies to --objective full only")
    return a


def logprobs(model, pairs: list[tuple[list[int], list[int]]], temperature: float = 1.0,
             full: bool = False) -> list[torch.Tensor]:
    """Per-token log-probs of each response given its prompt (right-padded batch), of the
    model's distribution at ``temperature`` (log-softmax of logits / temperature); with ``full``
    the whole distribution at each response position (``[len(r), V]``) instead."""
    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, (p, r) in enumerate(pairs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        att[i, :len(p) + len(r)] = 1
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float() / temperature, -1)
    if full:
        return [lp[i, len(p) - 1:len(p) - 1 + len(r)] for i, (p, r) in enumerate(pairs)]
    return [lp[i, len(p) - 1:len(p) - 1 + len(r)].gather(-1, torch.tensor(r)[:, None])[:, 0]
            for i, (p, r) in enumerate(pairs)]


def logprobs_chunked(model, pairs: list[tuple[list[int], list[int]]], **kw) -> list[torch.Tensor]:
    """:func:`logprobs` over ``MICRO`` sequences at a time (bounded memory for large batches)."""
    return [x for c in range(0, len(pairs), MICRO) for x in logprobs(model, pairs[c:c + MICRO], **kw)]


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
        if a.objective == "sft":   # the control: batches of the teacher's answers instead of rollouts
            self.rows = []
            for f in sorted((w / a.sft_data / "shards").glob("*/*.parquet")):
                for r in pq.read_table(f).to_pylist():
                    seq = encode_sft_row(self.tok, r["messages"], 512, f.name)
                    first, last = int(seq.labels.argmax()), int(len(seq.labels) - seq.labels[::-1].argmax())
                    self.rows.append(dict(prompt_token_ids=seq.tokens[:first].tolist(),
                                          response_token_ids=seq.tokens[first:last].tolist()))
        if a.objective == "full" and not a.online:   # the teacher's whole distribution on the fixed rollouts
            pairs = [(r["prompt_token_ids"], r["response_token_ids"]) for r in self.rows]
            with torch.no_grad():
                for r, s in zip(self.rows, logprobs_chunked(self.teacher, pairs, full=True), strict=True):
                    r["teacher_logprobs"] = s

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
        chosen, pairs = random.sample(self.prompts, n), []
        for c in range(0, n, MICRO):
            x = self.tok([self.chat(m) for m in chosen[c:c + MICRO]], return_tensors="pt", padding=True)
            y = self.student.generate(**x, max_new_tokens=96, do_sample=True, temperature=self.a.temperature,
                                      top_p=1.0, top_k=0, pad_token_id=self.tok.pad_token_id)
            for i in range(len(y)):
                prompt = x["input_ids"][i][x["attention_mask"][i].bool()].tolist()
                resp = y[i, x["input_ids"].shape[1]:].tolist()
                resp = resp[:resp.index(self.im_end) + 1] if self.im_end in resp else resp
                pairs.append((prompt, [t for t in resp if t != self.tok.pad_token_id] or [self.im_end]))
        full = self.a.objective == "full"
        scores = logprobs_chunked(self.teacher, pairs, temperature=self.a.teacher_temperature, full=full)
        self.student.train()
        return [dict(prompt_token_ids=p, response_token_ids=r, teacher_logprobs=s if full else s.tolist(),
                     rollout_logprobs=None) for (p, r), s in zip(pairs, scores, strict=True)]

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
        full = a.objective == "full"
        if a.warmup:
            for g in opt.param_groups:
                g["lr"] = a.lr * min(1.0, step / a.warmup)
        n_tokens = sum(len(b["response_token_ids"]) for b in batch)
        opt.zero_grad()
        sums = {"adv": 0.0, "kl_to_sft": 0.0}
        for c in range(0, len(batch), MICRO):   # gradient accumulation: the mean over all the batch's tokens
            part = batch[c:c + MICRO]
            pairs = [(b["prompt_token_ids"], b["response_token_ids"]) for b in part]
            if a.objective == "sft":
                loss = -torch.cat(logprobs(p.student, pairs))
                stats = {"advantage": torch.zeros(1), "kl_ref": torch.zeros(1)}
            elif full:   # exact KL(student || teacher) at each visited position (offline: not reweighted)
                lp_full = torch.cat(logprobs(p.student, pairs, full=True))
                t_full = torch.cat([b["teacher_logprobs"] for b in part])
                if a.topk:
                    t_top, idx = t_full.topk(a.topk, -1)
                    s_top = lp_full.gather(-1, idx)
                    rest = lambda x: torch.log1p(-x.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))  # noqa: E731
                    lp_full, t_full = torch.cat([s_top, rest(s_top)], -1), torch.cat([t_top, rest(t_top)], -1)
                loss = (lp_full.exp() * (lp_full - t_full)).sum(-1)
                stats = {"advantage": -loss.detach(), "kl_ref": torch.zeros(1)}
            else:
                lp = torch.cat(logprobs(p.student, pairs))
                teacher = torch.tensor([x for b in part for x in b["teacher_logprobs"]])
                rollout = None if a.online else torch.tensor([x for b in part for x in b["rollout_logprobs"]])
                if a.adv_floor:
                    teacher = torch.maximum(teacher, lp.detach() - a.adv_floor)
                loss, stats = opd_loss_per_token(lp, lp.detach(), teacher, rollout, iw_cap=a.iw_cap or None,
                                                 kl_coef=a.kl_coef)
            (loss.sum() / n_tokens).backward()
            sums["adv"] += stats["advantage"].sum().item() / n_tokens
            sums["kl_to_sft"] += stats["kl_ref"].sum().item() / n_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(p.student.parameters(), 1.0)
        opt.step()
        if step % a.every == 0 or step == a.steps:
            print(json.dumps({"step": step, "acc": p.evaluate(), "adv": round(sums["adv"], 4),
                              "kl_to_sft": round(sums["kl_to_sft"], 4),
                              "grad_norm": round(grad_norm.item(), 3), "s": round(time.time() - t0)}), flush=True)
    if a.save:
        p.student.save_pretrained(a.save)
        p.tok.save_pretrained(a.save)


if __name__ == "__main__":
    main()
