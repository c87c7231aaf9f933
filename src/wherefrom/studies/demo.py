"""``wherefrom demo``: fine-tune, fit EK-FAC, attribute held-out queries, compare with identity.

Steps (each cached under the demo folder and reused by a second run):

1. generate the rule-identification task (:func:`wherefrom.studies.generated.rule_identification`);
2. LoRA-fine-tune the model on it (:func:`wherefrom.models.finetune.finetune`);
3. fit EK-FAC on the LoRA parameters and index the training gradients (a run directory);
4. score held-out queries with EK-FAC and with the identity (gradient dot product) from the same
   index, print their top proponents, and the share of queries whose top-1 proponent carries the
   query's label, for both methods side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from wherefrom.core.data import Record
from wherefrom.core.scoring import Scores
from wherefrom.core.store import OutputExists, atomic_write_json, read_json_object, settings_differences
from wherefrom.curvature import make_curvature
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run, RunConfig
from wherefrom.models.finetune import FinetuneConfig, finetune
from wherefrom.models.loading import cache_root, load_model
from wherefrom.studies.generated import rule_identification, write_jsonl

MAX_LENGTH = 256
"""The demo's longest row, for its fine-tuning and its runs alike (the generated rows are short; a cache made
before FinetuneConfig's default became 512 is reused)."""

SETTINGS_FILE = "demo.json"
"""The demo settings its cache folder was made with."""


def top1_label_share(scores: Scores, queries: list[Record], labels: dict[str, str | None]) -> float:
    """Share of queries whose highest-scoring training row has the query's label."""
    hits = [labels[scores.top(q, 1)[0][0]] == query.label for q, query in enumerate(queries)]
    return sum(hits) / max(len(hits), 1)


def run_demo(
    cache: Path | None = None,
    n_train: int = 160,
    n_queries: int = 10,
    epochs: int = 2,
    model: str | None = None,
    device: str | None = None,
    progress: Progress = no_progress,
    console: Console | None = None,
) -> dict[str, float]:
    """Run the demo end to end; returns ``{method: top-1 label share}``. ``cache`` keeps every step of one setting
    (``demo.json`` records its training rows, epochs and model once its fine-tuning and run are made): a rerun reuses
    them, and one of other settings is refused naming each (:class:`wherefrom.core.store.OutputExists`: it replaced
    the fine-tuning, then the run refused the new adapter for good); ``n_queries`` may differ."""
    console = console or Console()
    folder = Path(cache) if cache else cache_root() / "demo"
    # what the cache's fine-tuning and run depend on (the queries are drawn after the training rows, and scored anew)
    settings = {"n_train": n_train, "epochs": epochs, "model": None if model is None else os.path.abspath(model)}
    record = folder / SETTINGS_FILE
    if record.is_file():
        differences = settings_differences(read_json_object(record), settings)
        if differences:
            raise OutputExists(
                f"{folder} holds the demo of other settings ({'; '.join(differences)}), which this one would "
                "replace: give another --cache"
            )
    train, queries = rule_identification(n_train=n_train, n_test=n_queries, seed=0)
    train_path = write_jsonl(train, folder / "train.jsonl")
    write_jsonl(queries, folder / "queries.jsonl")

    console.print(f"[bold]1/3[/] LoRA fine-tuning on {len(train)} generated rule-identification rows")
    base = load_model(model, device=device)
    tuned = finetune(
        base.model, base.tokenizer, train, FinetuneConfig(epochs=epochs, max_length=MAX_LENGTH), folder / "finetune",
        progress=True, overwrite=False,
    )  # fmt: skip
    tuned.check_finite("the demo's fine-tuning")
    console.print(
        f"    {'reused earlier fine-tuning' if tuned.reused else 'trained'}; loss per epoch {[round(x, 3) for x in tuned.epoch_losses]}"
    )
    del base, tuned

    console.print("[bold]2/3[/] fitting EK-FAC on the LoRA parameters and indexing training gradients")
    config = RunConfig(
        train=str(train_path),
        model=model,
        adapter=str(folder / "finetune" / "adapter"),
        device=device,
        attribution=AttributionConfig(strategy="ekfac", batch_size=8, max_length=MAX_LENGTH),
    )
    run = Run.create(folder / "run-ekfac", config, progress=progress)
    atomic_write_json(settings, record)  # once its fine-tuning and run are this setting's (an earlier version's
    # cache has no record: a fine-tuning of other settings was refused above, and the record is not written)
    run.fit()
    run.build_index()

    console.print(f"[bold]3/3[/] attributing {len(queries)} held-out queries")
    results = {"ekfac": run.scores(queries)}
    results["identity"] = run.scores(queries, curvature=make_curvature("identity"))
    labels = {r.id: r.label for r in train}
    text = {r.id: r for r in train}
    table = Table(title="top-3 proponents (label) of each held-out query")
    for column in ("query", "its label", "EK-FAC", "identity (gradient dot product)"):
        table.add_column(column, overflow="fold")
    for q, query in enumerate(queries):
        cells = [", ".join(f"{labels[i]}" for i, _ in results[m].top(q, 3)) for m in ("ekfac", "identity")]
        table.add_row(*map(Text, (query.prompt.replace("\n", " ")[30:], str(query.label), *cells)))
    console.print(table)
    share = {method: top1_label_share(scores, queries, labels) for method, scores in results.items()}
    example = results["ekfac"].top(0, 1)[0][0]
    console.print(
        f"example: query {queries[0].id!r} -> top EK-FAC proponent {example!r}: {text[example].prompt!r}{text[example].completion!r}",
        markup=False,
    )
    console.print(
        f"[bold]top-1 proponent has the query's label[/]: EK-FAC {share['ekfac']:.0%}, identity {share['identity']:.0%} "
        f"(chance {1 / len({r.label for r in train}):.0%}); run folder {escape(str(folder / 'run-ekfac'))}"
    )
    return share
