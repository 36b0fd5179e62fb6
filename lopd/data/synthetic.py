"""A synthetic, verifiable reasoning task for the embedded default (tiny models on a CPU).

Multi-step addition with running results: the question ``Compute 23+45+17.`` has the
solution chain ``23+45=68; 68+17=85. The answer is \\boxed{85}.`` Every step depends on the
previous running result, so a small student that slips once compounds the mistake on its
own rollouts — the regime where on-policy distillation helps. The answer sits in the
final ``\\boxed{}`` and is graded by math-verify like any math benchmark.

Two solution *styles* and two *draws* of ground-truth problems exist so the teacher-consistency
ablations can train another teacher on differently written chains, or in the same style on other
problems, than teacher A. Everything derives from a seed; no two splits share a question.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

STYLES = ("chain", "words")


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]

    @property
    def question(self) -> str:
        return f"Compute {'+'.join(map(str, self.terms))}."

    @property
    def answer(self) -> int:
        return sum(self.terms)

    def solution(self, style: str = "chain") -> str:
        """The worked solution ending in ``\\boxed{answer}``, in one of :data:`STYLES`."""
        acc, steps = self.terms[0], []
        for x in self.terms[1:]:
            if style == "chain":
                steps.append(f"{acc}+{x}={acc + x}")
            elif style == "words":
                steps.append(f"add {x} to {acc} to get {acc + x}")
            else:
                raise ValueError(f"unknown solution style {style!r} (choose from {', '.join(STYLES)})")
            acc += x
        if style == "chain":
            return f"{'; '.join(steps)}. The answer is \\boxed{{{acc}}}."
        return f"First {', then '.join(steps)}. So \\boxed{{{acc}}}."


def sample_problem(rng: random.Random, min_terms: int = 3, max_terms: int = 4, max_value: int = 99) -> Problem:
    n = rng.randint(min_terms, max_terms)
    return Problem(tuple(rng.randint(1, max_value) for _ in range(n)))


def make_splits(seed: int, sizes: dict[str, int], **kw) -> dict[str, list[Problem]]:
    """Disjoint splits (e.g. ``{"sft": 4000, "opd": 1000, "eval": 300}``) of distinct problems."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    out: dict[str, list[Problem]] = {}
    for name, n in sizes.items():
        probs: list[Problem] = []
        while len(probs) < n:
            p = sample_problem(rng, **kw)
            if p.terms not in seen:
                seen.add(p.terms)
                probs.append(p)
        out[name] = probs
    return out


def prompt_row(split: str, i: int, p: Problem) -> dict:
    """A prompts-contract row (docs/architecture.md): prompt_id, messages, answer."""
    return {"prompt_id": f"{split}-{i:06d}", "messages": [{"role": "user", "content": p.question}],
            "answer": str(p.answer)}


def sft_row(split: str, i: int, p: Problem, style: str) -> dict:
    """A ground-truth chat example (prompt + worked solution), e.g. to train a teacher."""
    row = prompt_row(split, i, p)
    row["messages"] = row["messages"] + [{"role": "assistant", "content": p.solution(style)}]
    return row


def benchmark_row(i: int, p: Problem, split: str = "arith") -> dict:
    """A math-benchmark row: problem_id, problem, answer."""
    return {"problem_id": f"{split}-{i:05d}", "problem": p.question, "answer": str(p.answer)}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def teacher_file(style: str, draw: int = 0) -> str:
    """The name (without ``.jsonl``) of the ground-truth chats in ``style`` on problem draw ``draw``."""
    return f"teacher_{style}" + (f"_draw{draw}" if draw else "")


def write_task(out_dir: str | Path, seed: int = 0, n_teacher: int = 4000, n_sft: int = 2000,
               n_opd: int = 1000, n_eval: int = 300, n_val: int = 0, **kw) -> dict[str, Path]:
    """Write every file the tiny pipeline needs; returns name -> path.

    - ``teacher_chain.jsonl`` / ``teacher_words.jsonl``: ground-truth chats (two styles) to
      train teachers; ``teacher_chain_draw1.jsonl`` / ``teacher_words_draw1.jsonl``: the same on a
      second draw of ``n_teacher`` problems, disjoint from every other split;
      ``corpus.txt``: text to train the shared tokenizer on (from the first draw);
    - ``sft_prompts.jsonl`` and ``opd_prompts.jsonl``: prompts for sft-data and precompute;
    - ``arith.jsonl``: the held-out benchmark (the test split);
    - ``arith_val.jsonl``: a validation split of ``n_val`` problems in the benchmark's format (with
      ``n_val`` > 0), for choosing settings without looking at the test split.
    """
    out = Path(out_dir)
    # the OPD split, the second teacher draw and the validation split come last, in that order, so
    # that each split is the same whatever the sizes of those after it
    splits = make_splits(seed, {"teacher": n_teacher, "sft": n_sft, "eval": n_eval, "opd": n_opd,
                                "teacher_draw1": n_teacher, "val": n_val}, **kw)
    paths = {}
    for draw, split in enumerate(("teacher", "teacher_draw1")):
        for style in STYLES:
            name = teacher_file(style, draw)
            paths[name] = write_jsonl(out / f"{name}.jsonl",
                                      [sft_row(split, i, p, style) for i, p in enumerate(splits[split])])
    paths["sft_prompts"] = write_jsonl(out / "sft_prompts.jsonl",
                                       [prompt_row("sft", i, p) for i, p in enumerate(splits["sft"])])
    paths["opd_prompts"] = write_jsonl(out / "opd_prompts.jsonl",
                                       [prompt_row("opd", i, p) for i, p in enumerate(splits["opd"])])
    paths["benchmark"] = write_jsonl(out / "arith.jsonl", [benchmark_row(i, p) for i, p in enumerate(splits["eval"])])
    if n_val:
        paths["validation"] = write_jsonl(out / "arith_val.jsonl",
                                          [benchmark_row(i, p, "arith-val") for i, p in enumerate(splits["val"])])
    corpus = out / "corpus.txt"
    with open(corpus, "w") as f:
        for p in splits["teacher"]:
            for style in STYLES:
                f.write(f"user\n{p.question}\nassistant\n{p.solution(style)}\n")
    paths["corpus"] = corpus
    return paths
