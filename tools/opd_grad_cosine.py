"""How noisy is the paper's per-token OPD gradient on the embedded default? (research tool)

Samples fresh rollouts from a pipeline-made SFT student, has the teacher give its whole
distribution at every response position, and prints the cosine between the gradient of lopd's
OPD loss (the sampled token's advantage, on-policy) and the gradient of the exact reverse KL
over the vocabulary at the same positions — for all rollouts together and for random batches
of several sizes. The two have the same expectation; the cosine says how much of one batch's
update is signal. Numbers in docs/repro.md ("Is it the estimator?").

    python tools/opd_grad_cosine.py --workdir . --rollouts 2048 --batches 64,256,1024 --draws 4
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import opd_probe as probe  # noqa: E402

from lopd.train.losses import opd_loss_per_token  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=".", help="directory with runs/tiny and runs/tiny-teacher")
    ap.add_argument("--student", default="runs/tiny/sft", help="student checkpoint, relative to --workdir")
    ap.add_argument("--rollouts", type=int, default=2048, help="fresh rollouts to sample")
    ap.add_argument("--batches", default="64,256,1024", help="batch sizes to draw from them")
    ap.add_argument("--draws", type=int, default=4, help="random batches per size")
    a = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    p = probe.Probe(probe.args(["--workdir", a.workdir, "--student", a.student, "--online", "--objective", "full"]))
    params = list(p.student.parameters())

    def grad(loss: torch.Tensor) -> torch.Tensor:
        p.student.zero_grad()
        loss.backward()
        return torch.cat([q.grad.flatten() for q in params]).clone()

    rows = p.fresh_rollouts(a.rollouts)
    pairs = [(r["prompt_token_ids"], r["response_token_ids"]) for r in rows]
    student = torch.cat(probe.logprobs_chunked(p.student, pairs, full=True))
    teacher = torch.cat([r["teacher_logprobs"] for r in rows])
    exact_kl = (student.exp() * (student - teacher)).sum(-1)
    g_exact = grad(exact_kl.mean())
    teacher_at = [r["teacher_logprobs"].gather(-1, torch.tensor(tok)[:, None])[:, 0]
                  for r, (_, tok) in zip(rows, pairs, strict=True)]

    def sampled_grad(idx: list[int]) -> torch.Tensor:
        lp = torch.cat(probe.logprobs_chunked(p.student, [pairs[i] for i in idx]))
        loss, _ = opd_loss_per_token(lp, lp.detach(), torch.cat([teacher_at[i] for i in idx]))
        return grad(loss.mean())

    def cos(x: torch.Tensor, y: torch.Tensor) -> float:
        return round((x @ y / x.norm() / y.norm()).item(), 3)

    print(json.dumps({"rollouts": len(rows), "exact_reverse_kl": round(exact_kl.mean().item(), 4),
                      "cos_all": cos(sampled_grad(list(range(len(rows)))), g_exact)}), flush=True)
    for n in (int(b) for b in a.batches.split(",")):
        print(json.dumps({"batch": n, "cos_to_exact": [cos(sampled_grad(random.sample(range(len(rows)), n)), g_exact)
                                                         for _ in range(a.draws)]}), flush=True)


if __name__ == "__main__":
    main()
