"""docs/recipes.md against the paper recipes: every value its tables give for a recipe is what
``lopd recipe show`` prints for it, and every row where lopd differs from the paper's code has a
reason in the table and a comment in the recipe."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.helpers.cli import REPO, lopd_cli

DOC = REPO / "docs" / "recipes.md"
PAPER = ("qwen3-8b", "qwen3-4b", "qwen3-30b-a3b")
# settings the tables must cover (the ones where lopd's defaults differ from the paper's code)
REQUIRED = {"opd.loss_agg", "precompute.sampling.temperature", "precompute.sampling.top_p", "sft.train.global_batch",
            "sft.train.micro_batch_tokens", "sft.train.max_seq_len", "sft.optim.betas", "sft.optim.weight_decay",
            "sft.truncated", "sft_data.sampling.max_tokens", "sft_data.inference.max_model_len",
            "opd.optim.decay_norms_and_biases", "opd.online.sampling.temperature", "opd.online.sampling.n",
            "opd.online.train_temperature"}


def doc_tables(text: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """Recipe name -> rows (setting, paper's code, lopd recipe, reason) of the table under its heading."""
    tables: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^## (\S+) \(`jobs/recipes/(\S+)\.yaml`\)$", line)
        if head:
            assert head.group(1) == head.group(2), line
            current = tables.setdefault(head.group(1), [])
        elif line.startswith("## "):
            current = None
        elif current is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 4, line
            current.append(tuple(cells))
    return tables


def ticked(cell: str) -> object:
    """The YAML value of a cell that starts with a `value`; raises ValueError for prose."""
    m = re.match(r"^`([^`]*)`", cell)
    if not m:
        raise ValueError(cell)
    return yaml.safe_load(m.group(1))


def lookup(data: dict, path: str) -> object:
    for part in path.split("."):
        assert isinstance(data, dict) and part in data, f"{path}: no such key in the resolved recipe"
        data = data[part]
    return data


def commented(recipe_text: str, path: str) -> bool:
    """Whether the recipe line that sets ``path`` has a comment, or follows a comment line."""
    lines = recipe_text.splitlines()
    top, *rest = path.split(".")
    i = next(n for n, ln in enumerate(lines) if ln.startswith(f"{top}:"))
    for part in rest:
        i = next(n for n in range(i, len(lines)) if re.search(rf"(^|[\s{{]){part}:", lines[n]))
    return "#" in lines[i] or lines[i - 1].strip().startswith("#")


TABLES = doc_tables(DOC.read_text())


def test_the_doc_covers_each_paper_recipe_and_the_readme_links_it():
    assert set(TABLES) == set(PAPER)
    for name, rows in TABLES.items():
        settings = [r[0].strip("`") for r in rows]
        assert len(settings) == len(set(settings)), f"{name}: a setting is listed twice"
        assert REQUIRED <= set(settings), f"{name}: missing {sorted(REQUIRED - set(settings))}"
    assert "docs/recipes.md" in (REPO / "README.md").read_text()


@pytest.mark.parametrize("name", PAPER)
def test_recipe_show_matches_the_doc_table(name):
    path = REPO / "jobs" / "recipes" / f"{name}.yaml"
    shown = json.loads(lopd_cli("recipe", "show", "-r", str(path), "--json").stdout)
    text = path.read_text()
    for setting, paper, lopd, reason in TABLES[name]:
        key = setting.strip("`")
        value = ticked(lopd)
        assert lookup(shown, key) == value, f"{name}: {key} is {lookup(shown, key)!r}, docs/recipes.md says {value!r}"
        try:
            same = ticked(paper) == value
        except ValueError:
            same = False
        if not same:
            assert reason, f"{name}: {key} differs from the paper's code ({paper}) with no reason in docs/recipes.md"
            assert commented(text, key), f"{name}: {key} differs from the paper's code with no comment in the recipe"


def test_table_parsing_and_comment_lookup():
    rows = doc_tables("## a (`jobs/recipes/a.yaml`)\n\n| setting | x | y | z |\n|---|---|---|---|\n"
                      "| `opd.loss_agg` | `sample-mean` (code) | `token-mean` | why |\n## other\n| `x.y` | 1 | 2 | |\n")
    assert rows == {"a": [("`opd.loss_agg`", "`sample-mean` (code)", "`token-mean`", "why")]}
    assert ticked("`[0.9, 0.999]`") == [0.9, 0.999] and ticked("`8.0e-5`") == 8e-5
    with pytest.raises(ValueError):
        ticked("16384, then cut")
    recipe = "sft:\n  # why\n  train: {steps: 1, global_batch: 2}\nopd:\n  train: {steps: 3}\n"
    assert commented(recipe, "sft.train.global_batch") and not commented(recipe, "opd.train.steps")
