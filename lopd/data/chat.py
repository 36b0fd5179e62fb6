"""Chat formatting: prompts rendered with the tokenizer's own chat template, as token ids.

The contract (docs/architecture.md, "Data contracts"):

- a prompt is ``apply_chat_template(messages, add_generation_prompt=True)`` and, when the
  template knows it, ``enable_thinking``; the result is token ids, never text that is later
  re-tokenised (re-tokenising a decoded response can change the tokens a teacher scores);
- a response is the token ids exactly as sampled, and ends with the end-of-turn token when
  generation stopped on it (the backends keep that token, see :mod:`lopd.inference`).
"""

from __future__ import annotations

from typing import Any

from lopd import LopdError


class ChatFormatError(LopdError):
    """A prompt that cannot be rendered with the chat template (names the prompt)."""


class TokenizerMismatchError(LopdError):
    """Two models that must share a vocabulary do not."""


def template_has_thinking(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template reads ``enable_thinking``."""
    tpl = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(tpl, dict):
        tpl = " ".join(tpl.values())
    return "enable_thinking" in tpl


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]], enable_thinking: bool | None = None) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template plus the generation prompt.

    ``enable_thinking`` is passed only when not None and the template uses it (templates
    without it render the same either way).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("the tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
    kwargs: dict[str, Any] = {}
    if enable_thinking is not None and template_has_thinking(tokenizer):
        kwargs["enable_thinking"] = enable_thinking
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def end_of_turn_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS plus the model's generation EOS."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    for t in [eos] if isinstance(eos, int) else (eos or []):
        if int(t) not in ids:
            ids.append(int(t))
    return ids


def decode_response(tokenizer: Any, token_ids: list[int], eos_ids: list[int] | tuple[int, ...] = ()) -> str:
    """Text of response tokens without the trailing end-of-turn token (other special tokens such as
    ``<think>`` are kept). For the SFT data, displays and graders; never re-tokenised for scoring."""
    ids = list(token_ids)
    if ids and ids[-1] in eos_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def check_same_vocab(tok_a: Any, tok_b: Any, name_a: str = "teacher", name_b: str = "student") -> None:
    """Raise :class:`TokenizerMismatchError` unless both tokenizers map the same strings to the same ids.

    Token ids from one model are scored by the other, so the vocabularies (including added
    special tokens) must be identical; the message names the first difference.
    """
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        return
    if len(va) != len(vb):
        raise TokenizerMismatchError(
            f"tokenizer mismatch: {name_a} has {len(va)} tokens, {name_b} has {len(vb)}; "
            "teacher and student must share one vocabulary")
    for tok, i in sorted(va.items(), key=lambda kv: kv[1]):
        if vb.get(tok) != i:
            raise TokenizerMismatchError(
                f"tokenizer mismatch: token {tok!r} is id {i} for {name_a} but {vb.get(tok)} for {name_b}; "
                "teacher and student must share one vocabulary")
    raise TokenizerMismatchError(f"tokenizer mismatch between {name_a} and {name_b}")
