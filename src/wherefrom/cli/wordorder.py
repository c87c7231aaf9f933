"""``wherefrom word-order``: Grosse et al.'s word-order study on invented facts (:mod:`wherefrom.studies.wordorder`)."""

from __future__ import annotations

from dataclasses import replace

import typer

from wherefrom.cli.app import command, fail, progress, recorded_line, remember, required, say
from wherefrom.core.data import DataError
from wherefrom.studies.finetuning import FIRST_FINETUNING
from wherefrom.studies.toolkit import refuse_foreign_report
from wherefrom.studies.wordorder import WordOrderConfig, run_word_order, tiny_finetune

STUDY_FINETUNING = {
    name: getattr(tiny_finetune(), name) or 0  # lora_rank None (every weight) is the flag's 0
    for name in FIRST_FINETUNING
}
"""word-order's defaults of the fine-tuning flags: the study's (:func:`wherefrom.studies.wordorder.tiny_finetune`),
not ``finetune``'s (2 epochs of a rank-4 LoRA at 1e-3 left the tiny models untrained: reversed/same 0.78
where the study's settings give 0.11)."""


@command(name="word-order", defaults=STUDY_FINETUNING)
def word_order(
    out,
    model,
    n_facts,
    repeats,
    n_controls,
    seeds,
    method,
    epochs,
    learning_rate,
    lora_rank,
    batch_size,
    max_length,
    overwrite,
    device,
    threads,
) -> None:
    """Influence on a query of training rows stating its fact in the query's order, reversed, and of unrelated
    rows; --out receives wordorder.json, wordorder.md and seed-<s>/finetune (a rerun reuses fine-tuned models of
    the same settings; one that would replace results of other settings is refused unless --overwrite)."""
    out = required(out, "out")
    defaults = WordOrderConfig(out=str(out))
    config = replace(
        defaults,
        model=model,
        n_facts=n_facts,
        repeats=repeats,
        n_controls=n_controls,
        seeds=[int(s) for s in seeds.split(",")] if seeds else defaults.seeds,
        method=method or defaults.method,
        finetune=replace(
            defaults.finetune,
            epochs=epochs,
            learning_rate=learning_rate,
            lora_rank=lora_rank,
            batch_size=batch_size,
            max_length=max_length,
        ),
        device=device,
    )
    try:
        refuse_foreign_report(out / "wordorder")  # before the work, not only as the tables are written
        remember(out)
        run_word_order(config, command=recorded_line(), log=say, overwrite=overwrite, progress=progress)
    except (DataError, ValueError, RuntimeError) as error:
        fail(error)
    typer.echo((out / "wordorder.md").read_text())
