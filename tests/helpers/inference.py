"""Inputs of the inference stages (sft-data, precompute): a prompts file, and a tiny model made
to end its turns often (so both "stop" and "length" finishes occur)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def write_prompts(path: Path, n: int, long_ids: tuple[str, ...] = ()) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt_id": f"p{i:03d}", "prompt": f"Compute {i}+{2 * i}+3.",
                                "answer": str(3 * i + 3)}) + "\n")
        for pid in long_ids:  # longer than the 256-token context: skipped and counted
            f.write(json.dumps({"prompt_id": pid, "prompt": "Compute 1+2. " * 150}) + "\n")
    return path


def bias_eos(src: Path, dst: Path, strength: float = 0.4) -> Path:
    """Copy a tiny model and make it end turns often: one embedding dimension is a constant for
    every token (so the final hidden state leans on it) and twice that for the end-of-turn token.
    Gives a mix of "stop" and "length" finishes, so the end-of-turn handling is exercised."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("MANIFEST.json"))
    eos = json.loads((dst / "config.json").read_text())["eos_token_id"]
    sd = load_file(dst / "model.safetensors")
    emb = sd["model.embed_tokens.weight"].clone()
    emb[:, 0] = strength
    emb[eos, 0] = 2 * strength
    sd["model.embed_tokens.weight"] = emb
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def sampling_logprobs(model: Path, prompts: list[list[int]], responses: list[list[int]], temperature: float,
                      top_p: float) -> list[list[float]]:
    """Reference log-probs of each response token under the sampling distribution: one full
    (uncached) transformers forward per sequence, ``log_softmax(logits / T)`` restricted to the
    smallest set of top tokens with mass >= top_p and renormalised (-inf outside it)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses, strict=True):
            logits = m(input_ids=torch.tensor([list(p) + list(r)])).logits[0, len(p) - 1:len(p) - 1 + len(r)]
            logp = torch.log_softmax(logits.double() / temperature, -1)
            lp_sorted, order = logp.sort(-1, descending=True)
            before = lp_sorted.exp().cumsum(-1) - lp_sorted.exp()  # mass of the tokens ranked above
            nucleus = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, order, before < top_p)
            logp = logp.masked_fill(~nucleus, float("-inf"))
            logp = logp - torch.logsumexp(logp, -1, keepdim=True)
            out.append(logp.gather(-1, torch.tensor(r)[:, None])[:, 0].tolist())
    return out
