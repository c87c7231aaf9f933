"""``wherefrom word-order``: Grosse et al.'s word-order study on invented facts (:mod:`wherefrom.studies.wordorder`)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import typer

from wherefrom.cli.app import app
from wherefrom.core.data import DataError
from wherefrom.models.loading import ModelLoadError
from wherefrom.studies.wordorder import WordOrderConfig, run_word_order

DEFAULTS = WordOrderConfig(out="")


@app.command("word-order")
def word_order(
    out: Path = typer.Option(..., help="Output folder: wordorder.json, wordorder.md, seed-<s>/finetune."),
    model: str | None = typer.Option(None, help="Base model folder (default: SmolLM2-135M-Instruct)."),
    n_facts: int = typer.Option(DEFAULTS.n_facts, help="Invented facts, one query each."),
    repeats: int = typer.Option(DEFAULTS.repeats, help="Training rows per fact and ordering."),
    n_controls: int = typer.Option(DEFAULTS.n_controls, help="Rows stating unrelated invented facts."),
    seeds: str = typer.Option(",".join(map(str, DEFAULTS.seeds)), help="Comma-separated seeds (facts and training)."),
    method: str = typer.Option(DEFAULTS.method, help="Attribution method (see `wherefrom attribute --help`)."),
    epochs: int = typer.Option(DEFAULTS.finetune.epochs),
    learning_rate: float = typer.Option(DEFAULTS.finetune.learning_rate),
    lora_rank: int | None = typer.Option(
        DEFAULTS.finetune.lora_rank, help="LoRA rank (default: fine-tune every parameter)."
    ),
    batch_size: int = typer.Option(DEFAULTS.finetune.batch_size),
    max_length: int = typer.Option(DEFAULTS.finetune.max_length),
    device: str | None = typer.Option(None),
) -> None:
    """Influence on a query of training rows stating its fact in the query's order, reversed, and of unrelated rows."""
    config = WordOrderConfig(
        out=str(out),
        model=model,
        n_facts=n_facts,
        repeats=repeats,
        n_controls=n_controls,
        seeds=[int(s) for s in seeds.split(",") if s.strip()],
        method=method,
        finetune=replace(
            DEFAULTS.finetune,
            epochs=epochs,
            learning_rate=learning_rate,
            lora_rank=lora_rank,
            batch_size=batch_size,
            max_length=max_length,
        ),
        device=device,
    )
    try:
        run_word_order(
            config, command=" ".join(["wherefrom", *sys.argv[1:]]), log=lambda line: typer.echo(line, err=True)
        )
    except (DataError, ModelLoadError, ValueError, RuntimeError) as error:
        raise typer.BadParameter(str(error)) from error
    typer.echo((out / "wordorder.md").read_text())
