"""Dataset converters (lopd.data.convert, ``lopd prompts convert``): small files in the row formats
the hub serves for OpenThoughts3-1.2M and DAPO-Math-17k become prompt files load_prompts reads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lopd.data.convert import ConvertError, convert
from lopd.data.prompts import load_prompts
from tests.helpers.cli import lopd_cli
from tests.helpers.prompts import write_non_utf8_jsonl

DAPO_TEMPLATE = ("Solve the following math problem step by step. The last line of your response should be of the "
                 "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
                 "Remember to put your answer on its own line after \"Answer:\".")

# open-thoughts/OpenThoughts3-1.2M (data/train-*.parquet)
OT3_SCHEMA = pa.schema([("difficulty", pa.int64()), ("source", pa.string()), ("domain", pa.string()),
                        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())])))])
# BytedTsinghua-SIA/DAPO-Math-17k (data/dapo-math-17k.parquet)
DAPO_SCHEMA = pa.schema([("data_source", pa.string()),
                         ("prompt", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                         ("ability", pa.string()),
                         ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
                         ("extra_info", pa.struct([("index", pa.string())]))])


def ot3_row(question: str, domain: str = "math") -> dict:
    return {"difficulty": 6, "source": "ai2-adapt-dev/openmath-2-math", "domain": domain,
            "conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": "<think>\nok\n</think>\n\n\\boxed{1}"}]}


def dapo_row(problem: str, answer: str, index: str) -> dict:
    return {"data_source": "math_dapo", "prompt": [{"content": DAPO_TEMPLATE.format(problem), "role": "user"}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": index}}


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_openthoughts3_parquet_shards_keep_repeats_and_drop_the_answer(tmp_path):
    a = write_parquet(tmp_path / "train-00000-of-00002.parquet",
                      [ot3_row("What is 1+1?"), ot3_row("What is 1+1?")], OT3_SCHEMA)
    b = write_parquet(tmp_path / "train-00001-of-00002.parquet", [ot3_row("Sort a list.", "code")], OT3_SCHEMA)
    res = lopd_cli("prompts", "convert", str(a), str(b), str(tmp_path / "sft.jsonl"))
    assert "3 prompts (openthoughts3; 3 rows read, 0 repeated prompts dropped)" in res.stdout
    rows = read_jsonl(tmp_path / "sft.jsonl")
    assert [r["prompt_id"] for r in rows] == ["ot3-0000000", "ot3-0000001", "ot3-0000002"]
    assert rows[2]["messages"] == [{"role": "user", "content": "Sort a list."}]
    assert all("answer" not in r for r in rows)
    assert [p.messages for p in load_prompts(str(tmp_path / "sft.jsonl"))] == [r["messages"] for r in rows]


def test_dapo_parquet_dedupes_and_keeps_ground_truth(tmp_path):
    rows = [dapo_row("Find $x$ if $x+1=3$.", "2", "uuid-a"), dapo_row("Find $x$ if $x+1=3$.", "2", "uuid-b"),
            dapo_row("Compute $2^5$.", "32", "uuid-c")]
    src = write_parquet(tmp_path / "dapo-math-17k.parquet", rows, DAPO_SCHEMA)
    c = convert([str(src)], tmp_path / "opd.parquet")
    assert (c.dataset, c.rows, c.prompts, c.duplicates) == ("dapo-math", 3, 2, 1)
    got = load_prompts(str(tmp_path / "opd.parquet"))
    assert [(p.prompt_id, p.answer) for p in got] == [("uuid-a", "2"), ("uuid-c", "32")]
    # the chat list stays a chat list: the content is the problem text, not the string of a Python list
    assert got[1].messages == [{"role": "user", "content": DAPO_TEMPLATE.format("Compute $2^5$.")}]


def test_dapo_jsonl_with_label_and_generic_chat_rows(tmp_path):
    src = tmp_path / "dapo-math-17k.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": [{"content": f"Q{i}", "role": "user"}], "label": str(i)})
                             for i in range(3)) + "\n")
    convert([str(src)], tmp_path / "a.jsonl")
    assert [(r["prompt_id"], r["answer"]) for r in read_jsonl(tmp_path / "a.jsonl")] == [
        ("dapo-0000000", "0"), ("dapo-0000001", "1"), ("dapo-0000002", "2")]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"id": 7, "prompt": "Add 2 and 3.", "answer": 5}) + "\n" + json.dumps(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]}) + "\n")
    c = convert([str(chat)], tmp_path / "b.jsonl")
    assert c.dataset == "chat"
    assert read_jsonl(tmp_path / "b.jsonl") == [
        {"prompt_id": "7", "messages": [{"role": "user", "content": "Add 2 and 3."}], "answer": "5"},
        {"prompt_id": "row-0000001", "messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hi"}]}]


def test_sample_is_seeded_and_keeps_input_order(tmp_path):
    src = write_parquet(tmp_path / "t.parquet", [ot3_row(f"Q{i}") for i in range(50)], OT3_SCHEMA)
    ids = []
    for name in ("a", "b"):
        convert([str(src)], tmp_path / f"{name}.jsonl", sample=10, seed=42)
        ids.append([r["prompt_id"] for r in read_jsonl(tmp_path / f"{name}.jsonl")])
    assert ids[0] == ids[1] == sorted(ids[0]) and len(set(ids[0])) == 10
    # the selection of the paper's code: random.seed(seed); sorted(random.sample(range(rows), n))
    assert ids[0] == [f"ot3-{i:07d}" for i in sorted(random.Random(42).sample(range(50), 10))]
    convert([str(src)], tmp_path / "c.jsonl", sample=10, seed=43)
    assert [r["prompt_id"] for r in read_jsonl(tmp_path / "c.jsonl")] != ids[0]


@pytest.mark.parametrize("rows, dataset, message", [
    ([{"conversations": [{"from": "robot", "value": "x"}]}], "auto",
     r"row 0: field 'conversations\[0\].from': unknown speaker 'robot'"),
    ([{"conversations": [{"from": "gpt", "value": "only an answer"}]}], "auto",
     r"row 0: field 'conversations': empty prompt"),
    ([{"prompt": [{"content": "x", "role": "user"}], "label": "1"}, {"prompt": "x"}], "dapo-math",
     r"row 1: missing field 'reward_model.ground_truth' \(or 'label'\)"),
    ([{"prompt": [{"role": "user", "content": 3}]}], "chat", r"row 0: field 'prompt\[0\].content': expected a string"),
    ([{"question": "x"}], "auto", r"row 0: no 'conversations', 'messages' or 'prompt' column \(columns: question\)"),
    ([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}], "auto",
     r"row 1: duplicate prompt id 'a' \(first at .*row 0\)"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, rows, dataset, message):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConvertError, match=message) as exc:
        convert([str(src)], tmp_path / "out.jsonl", dataset=dataset)
    assert str(exc.value).startswith(f"{src}: ") and "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == [src]  # nothing written


def test_cli_refuses_non_utf8_and_unknown_suffixes_with_exit_2(tmp_path):
    bad = write_non_utf8_jsonl(tmp_path / "p.jsonl")
    res = lopd_cli("prompts", "convert", str(bad), str(tmp_path / "out.jsonl"), check=False)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip() == f"error: {bad}: line 2: not UTF-8 text (byte 34 of the line)"
    assert not (tmp_path / "out.jsonl").exists()
    res = lopd_cli("prompts", "convert", str(bad), str(tmp_path / "out.csv"), check=False)
    assert res.returncode == 2 and "out.csv: unsupported output file type" in res.stderr
    res = lopd_cli("prompts", "convert", str(tmp_path / "none.parquet"), str(tmp_path / "o.jsonl"), check=False)
    assert res.returncode == 2 and "input file not found" in res.stderr
