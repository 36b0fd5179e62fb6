"""``lopd init-model``: random-initialised Hugging Face models with a freshly trained tokenizer.

Tests and the demo need real models without a hub. This makes one: a byte-level BPE
tokenizer trained on a given text corpus (with Qwen-style chat special tokens and a chat
template that honours ``enable_thinking``), and a Qwen3 dense or Qwen3-MoE model of a given
size with random weights, saved in HF format (safetensors + config + tokenizer) with a
MANIFEST.json carrying file hashes and the fingerprint.

``--tokenizer qwen3`` (when no directory of that name exists) gives the model Qwen3's real
tokenizer instead — its 151,643 BPE ranks, special tokens at their real ids and the stock Qwen3
chat template (:mod:`lopd.qwen_vocab`) — and Qwen3's 151,936-row embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lopd import LopdError, __version__, qwen_vocab

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen-style ChatML. The {% generation %} block marks assistant tokens for SFT loss masks.
CHAT_TEMPLATE = r"""{%- for message in messages %}
{%- if message['role'] == 'assistant' %}
{{- '<|im_start|>assistant\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}"""

PRESETS: dict[str, dict[str, int]] = {
    # head_dim 32/64: sizes vLLM's CPU attention supports
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=32, intermediate_size=128),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32, intermediate_size=384),
    "base": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=64, intermediate_size=768),
}
ARCHS = ("qwen3", "qwen3-moe")


class InitModelError(LopdError):
    pass


def check_corpus(corpus: str | Path, vocab_size: int) -> None:
    """The tokenizer corpus exists and is not empty; the vocabulary holds the byte alphabet."""
    if not Path(corpus).is_file() or Path(corpus).stat().st_size == 0:
        raise InitModelError(f"init-model: corpus file not found or empty: {corpus}")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise InitModelError(f"init-model: --vocab-size must be >= {256 + len(SPECIAL_TOKENS)} (byte alphabet)")


def train_tokenizer(corpus: str | Path, vocab_size: int, out_dir: str | Path):
    """Train a byte-level BPE on ``corpus`` and save it as a fast HF tokenizer with a chat template."""
    check_corpus(corpus, vocab_size)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(corpus)
    tok = Tokenizer(models.BPE())
    # one token per digit (as Qwen's tokenizer does): arithmetic stays learnable by small models
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_config(arch: str, vocab_size: int, tokenizer, max_position_embeddings: int = 4096,
                 num_experts: int = 4, num_experts_per_tok: int = 2, **sizes: int):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        torch_dtype="float32",
        **sizes,
    )
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "qwen3-moe":
        inter = common.pop("intermediate_size")
        return Qwen3MoeConfig(
            **common,
            intermediate_size=inter,
            moe_intermediate_size=max(16, inter // num_experts_per_tok),
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    raise InitModelError(f"init-model: unknown --arch {arch!r} (choose from {', '.join(ARCHS)})")


def init_model(
    out: str | Path,
    arch: str = "qwen3",
    size: str = "tiny",
    corpus: str | Path | None = None,
    tokenizer: str | Path | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    overrides: dict[str, int] | None = None,
    max_position_embeddings: int = 4096,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
) -> Path:
    """Create the model directory ``out`` and return it (see module docstring)."""
    out = Path(out)
    if arch not in ARCHS:
        raise InitModelError(f"init-model: unknown --arch {arch!r} (choose from {', '.join(ARCHS)})")
    if size not in PRESETS:
        raise InitModelError(f"init-model: unknown --size {size!r} (choose from {', '.join(PRESETS)})")
    if (corpus is None) == (tokenizer is None):
        raise InitModelError("init-model: give exactly one of --corpus (train a tokenizer) or --tokenizer DIR|qwen3")
    if out.exists() and any(out.iterdir()):
        raise InitModelError(f"init-model: output directory is not empty: {out}")
    if corpus is not None:
        check_corpus(corpus, vocab_size)
    import torch  # after the arguments are checked: a bad one is an error within a second
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lopd.fingerprint import fingerprint_local
    from lopd.layout import MANIFEST
    from lopd.manifest import Manifest, describe_dir, manifest_bytes, now

    out.mkdir(parents=True, exist_ok=True)
    rows = None
    if corpus is not None:
        tok = train_tokenizer(corpus, vocab_size, out)
    elif str(tokenizer) == qwen_vocab.NAME and not Path(tokenizer).is_dir():
        tok, rows = qwen_vocab.qwen3_tokenizer(out), qwen_vocab.VOCAB_ROWS
    else:
        if not Path(tokenizer).is_dir():
            raise InitModelError(f"init-model: tokenizer directory not found: {tokenizer}")
        tok = AutoTokenizer.from_pretrained(str(tokenizer))
        tok.save_pretrained(str(out))
    sizes = {**PRESETS[size], **(overrides or {})}
    vocab = rows or (len(tok) + 63) // 64 * 64
    cfg = build_config(arch, vocab, tok, max_position_embeddings, num_experts, num_experts_per_tok, **sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id
    )
    model.save_pretrained(str(out), safe_serialization=True)
    fp = fingerprint_local(out, use_cache=False)
    m = Manifest(
        stage="init-model",
        run_id="init-model",
        created_at=now(),
        files=describe_dir(out),
        lineage={"fingerprint": fp, "arch": arch, "size": size, "seed": seed, "parameters":
                 sum(p.numel() for p in model.parameters())},
        lopd_version=__version__,
    )
    (out / MANIFEST).write_bytes(manifest_bytes(m))
    return out
