"""Chat formatting: prompts rendered with the tokenizer's own chat template, as token ids.

The contract (docs/architecture.md, "Data contracts"):

- a prompt is ``apply_chat_template(messages, add_generation_prompt=True)`` and, when the
  template knows it, ``enable_thinking``; the result is token ids, never text that is later
  re-tokenised (re-tokenising a decoded response can change the tokens a teacher scores);
- a response is the token ids exactly as sampled, and ends with the end-of-turn token when
  generation stopped on it (the backends keep that token, see :mod:`lopd.inference`);
- an SFT target (:func:`sft_target`) is the last assistant turn, found by rendering: the
  ``{% generation %}`` markers when the template has them, else the tokens after the prompt
  rendered with the generation prompt (which must be a token prefix of the whole conversation)
  through the first end-of-turn token. An answer cut off by the length limit is the prompt's
  tokens plus the answer's, nothing rendered after the cut.
"""

from __future__ import annotations

import re
from typing import Any

from lopd import LopdError


class ChatFormatError(LopdError):
    """A prompt that cannot be rendered with the chat template (names the prompt)."""


class TokenizerMismatchError(LopdError):
    """Two models that must share a vocabulary (or a chat template's rendering) do not."""


class ChatTemplateError(ChatFormatError):
    """A chat template whose rendering gives no well-defined assistant span."""


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


# --------------------------------------------------------------------------- SFT targets

_GENERATION_RE = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_markers(tokenizer: Any) -> bool:
    """Whether the chat template marks assistant tokens with ``{% generation %}`` blocks."""
    tpl = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(tpl, dict):
        tpl = " ".join(tpl.values())
    return bool(_GENERATION_RE.search(tpl))


def _render(tokenizer: Any, messages: list[dict], enable_thinking: bool | None, prompt: bool = False,
            **kwargs: Any) -> Any:
    """The template applied to ``messages`` (with the generation prompt when ``prompt``); a template
    that raises is a :class:`ChatTemplateError` with its message."""
    from jinja2 import TemplateError

    try:
        if prompt:
            return encode_prompt(tokenizer, messages, enable_thinking)
        if enable_thinking is not None and template_has_thinking(tokenizer):
            kwargs["enable_thinking"] = enable_thinking
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template fails: {e}") from None


def sft_target(tokenizer: Any, messages: list[dict], enable_thinking: bool | None = None,
               finished: bool = True) -> tuple[list[int], int, int]:
    """Token ids of an SFT conversation and its target span ``[start, end)``: the last assistant turn.

    Earlier assistant turns are context (they are part of the prompt the teacher answered).
    ``messages[-1]`` must be the assistant's; ``enable_thinking`` must be what the answer was
    sampled with. Finished answers (``finished=True``):

    - templates with ``{% generation %}`` markers: the last marked span;
    - any other template: the conversation rendered whole must start with the exact tokens of the
      prompt rendered with the generation prompt (as sampling saw it); the target is what follows,
      through the first end-of-turn token (the tokenizer's EOS). For Qwen3's stock template this is
      ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}<|im_end|>`` with thinking on, and
      ``{answer}<|im_end|>`` after the empty think block of the generation prompt with it off.

    An answer cut off by the length limit (``finished=False``) is not rendered by the template
    (which would close it, and may wrap it in a think block): the target is the answer's own tokens
    right after the prompt, with no end-of-turn token — exactly what the teacher sampled, also for
    templates whose generation prompt opens the think block. Raises :class:`ChatTemplateError`
    when the template gives no such span (one line, naming the problem).
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ChatFormatError("the last turn is not an assistant turn")
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("the tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
    prompt = _render(tokenizer, messages[:-1], enable_thinking, prompt=True)
    if not finished:
        answer = tokenizer.encode(messages[-1].get("content") or "", add_special_tokens=False)
        return prompt + [int(t) for t in answer], len(prompt), len(prompt) + len(answer)
    if has_generation_markers(tokenizer):
        enc = _render(tokenizer, messages, enable_thinking, return_assistant_tokens_mask=True)
        ids, mask = [int(t) for t in enc["input_ids"]], list(enc["assistant_masks"])
        ends = [i + 1 for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
        if not ends:
            raise ChatTemplateError("the chat template's {% generation %} block marks no assistant tokens")
        start = ends[-1]
        while start > 0 and mask[start - 1]:
            start -= 1
        return ids, start, ends[-1]
    ids = [int(t) for t in _render(tokenizer, messages, enable_thinking)["input_ids"]]
    if ids[:len(prompt)] != prompt:
        i = next((k for k, (a, b) in enumerate(zip(prompt, ids, strict=False)) if a != b), min(len(prompt), len(ids)))
        raise ChatTemplateError(
            f"the chat template renders the prompt differently with and without the answer (token {i}: "
            f"{tokenizer.decode(prompt[i:i + 4])!r} with the generation prompt, {tokenizer.decode(ids[i:i + 4])!r} "
            "in the conversation), so the answer's tokens cannot be located")
    eot = set(end_of_turn_ids(tokenizer))
    end = next((k + 1 for k in range(len(prompt), len(ids)) if ids[k] in eot), None)
    if end is None:
        raise ChatTemplateError(f"the chat template renders no end-of-turn token ({tokenizer.eos_token!r}) "
                                "after the assistant turn")
    return ids, len(prompt), end


PROBE = [{"role": "user", "content": "What is 12 + 30?\nAnswer briefly."},
         {"role": "assistant", "content": "<think>\n12 + 30 = 42.\n</think>\n\nThe answer is 42."}]
"""The conversation whose rendering teacher and student must share."""


def chat_rendering(tokenizer: Any, enable_thinking: bool | None = None) -> dict[str, Any]:
    """How the tokenizer's chat template renders :data:`PROBE`: the prompt with the generation
    prompt and the whole conversation, as token ids (what :func:`check_same_rendering` compares)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("the tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)")
    return {"enable_thinking": enable_thinking,
            "prompt": _render(tokenizer, PROBE[:-1], enable_thinking, prompt=True),
            "conversation": [int(t) for t in _render(tokenizer, PROBE, enable_thinking)["input_ids"]]}


def check_same_rendering(tok_a: Any, tok_b: Any, name_a: str = "teacher", name_b: str = "student",
                         enable_thinking: bool | None = None) -> None:
    """Raise :class:`TokenizerMismatchError` unless both chat templates render the same conversation
    to the same token ids (prompt with generation prompt, and whole).

    ``tok_a`` may be a tokenizer or a :func:`chat_rendering` record (as sft-data keeps in its
    manifest's lineage, so the teacher need not be loaded again). SFT trains the student with its
    own template on answers the teacher sampled after its template's prompt: a different rendering
    would train on prompts the teacher never saw.
    """
    a = tok_a if isinstance(tok_a, dict) else chat_rendering(tok_a, enable_thinking)
    b = chat_rendering(tok_b, a.get("enable_thinking", enable_thinking))
    for part in ("prompt", "conversation"):
        x, y = list(a[part]), b[part]
        if x != y:
            i = next((k for k, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
            raise TokenizerMismatchError(
                f"chat template mismatch: {name_a} and {name_b} render the same {part} differently (token {i}: "
                f"{x[i] if i < len(x) else 'end'} vs {y[i] if i < len(y) else 'end'}); teacher and student "
                "must share one chat template")
