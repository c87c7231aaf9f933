"""Commands on a run directory: ``fit`` (curvature), ``index`` (training gradients), ``scores`` and
``query`` (influence of the training rows on queries)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wherefrom.cli.app import command, console, fail, merged_options, progress, remember, settings_as
from wherefrom.cli.settings import ATTRIBUTION
from wherefrom.core.data import DataError, Record, load_records
from wherefrom.core.store import StoreError, refuse_overwrite, strict_json, writer_lock
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run, RunConfig, RunMismatch
from wherefrom.models.loading import ModelLoadError


def notify(opened: Run) -> None:
    """Print what a writer found and repaired (damaged files rebuilt, unknown partial state discarded)."""
    for notice in opened.notices:
        console.print("[yellow]note:[/]", escape(notice))


@command(uses=(*ATTRIBUTION, "fisher", "reduction", "query_rank", "seed", "threads"))
def fit(train, run, model, adapter, strategy, strategy_option, device, **settings) -> None:
    """Fit the curvature on the training set (resumes: an existing fit is reused)."""
    try:
        options = merged_options(strategy_option, strategy, "--strategy-option")
        attribution = settings_as(AttributionConfig, strategy=strategy, strategy_options=options)
        config = RunConfig(train=str(train), model=model, adapter=adapter, device=device, attribution=attribution)
        opened = Run.create(run, config, progress=progress)
        remember(run)
        fitted = opened.fit()
    except (DataError, ModelLoadError, RunMismatch, StoreError, ValueError, MemoryError) as error:
        fail(error)
    notify(opened)
    state = "fitted" if fitted else "already fitted (reused, checksums verified)"
    console.print(
        f"{strategy} {state}: {len(opened.attributor.modules)} modules, {len(opened.train)} rows -> {run / 'factors'}"
    )


@command
def index(run, shard_size, dtype, device, threads) -> None:
    """Store the training set's per-example gradients so that queries need no train pass (resumes;
    refuses another --shard-size / --dtype than the interrupted index was started with)."""
    try:
        opened = Run.open(run, progress=progress, device=device, factors=False)
        written = opened.build_index(shard_size, dtype)
    except (FileNotFoundError, RunMismatch, StoreError, ValueError) as error:
        fail(error)
    notify(opened)
    console.print(f"index complete ({written} shards written now) -> {run / 'index'}")


@command
def scores(run, queries, name, top_k, overwrite, device, threads) -> None:
    """Pairwise influence of every training row on every query row; saved under RUN/scores/ (an earlier
    set of the same --name is kept unless --overwrite)."""
    try:
        if not overwrite:
            refuse_overwrite([run / "scores" / f"{name}.safetensors", run / "scores" / f"{name}.json"])
        opened = Run.open(run, progress=progress, device=device)
        with writer_lock(run):  # a writer of RUN/scores: refuse before the work while another writer runs
            result = opened.scores(load_records(queries))
            path = opened.save_scores(result, name)
    except (DataError, FileNotFoundError, RunMismatch, RuntimeError, ValueError) as error:
        fail(error)
    for q, query_id in enumerate(result.query_ids):
        tops = ", ".join(f"{i} ({s:+.3g})" for i, s in result.top(q, top_k))
        console.print(f"[bold]{query_id}[/]: {tops}")
    console.print(f"{tuple(result.total.shape)} scores -> {path}")


@command
def query(prompt, completion, run, top_k, as_json, by_module, per_token, html, device, threads) -> None:
    """Top proponents and opponents of one (prompt, completion) among the training rows."""
    try:
        opened = Run.open(run, progress=progress, device=device)
        record = Record(id="query", prompt=prompt, completion=completion)
        result = opened.scores([record])
    except (DataError, FileNotFoundError, RunMismatch, RuntimeError, ValueError) as error:
        fail(error)
    rows = {r.id: r for r in opened.train}
    position = {row_id: i for i, row_id in enumerate(result.train_ids)}
    tokenizer = opened.loaded.tokenizer

    def describe(row_id: str, score: float) -> dict:
        row = rows[row_id]
        column = result.per_module[:, 0, position[row_id]]
        order = column.abs().argsort(descending=True)[:by_module].tolist()
        return {
            "id": row_id,
            "score": score,
            "label": row.label,
            "prompt": row.prompt,
            "completion": row.completion,
            "top_modules": [[result.module_names[i], float(column[i])] for i in order],
        }

    report = {
        "query": {"prompt": prompt, "completion": completion},
        "strategy": opened.config.attribution.strategy,
        "sign": "positive = proponent (raises log p(completion | prompt))",
        "proponents": [describe(i, s) for i, s in result.top(0, top_k)],
        "opponents": [describe(i, s) for i, s in result.top(0, top_k, opponents=True)],
    }
    if per_token:
        top_rows = [rows[p["id"]] for p in report["proponents"]]
        _, tokens = opened.attributor.token_scores([record], top_rows)
        for entry, (_row_id, input_ids, values) in zip(report["proponents"], tokens):
            entry["tokens"] = [[tokenizer.decode([t]), float(v)] for t, v in zip(input_ids, values[0])]
    if html is not None:
        from wherefrom.cli.report import write_query_html

        console.print(f"query view -> {write_query_html(html, report, result, opened, record)}")
    if as_json:
        typer.echo(json.dumps(strict_json(report), indent=2, allow_nan=False))
        return
    print_report(report)


def print_report(report: dict) -> None:
    """The proponent and opponent tables of a ``query`` report on stdout, then each proponent's tokens."""
    out = Console()
    for kind in ("proponents", "opponents"):
        table = Table(title=f"{kind} ({report['strategy']}; {report['sign']})", show_lines=False)
        for column in ("rank", "score", "id", "label", "text", "top modules"):
            table.add_column(column, overflow="fold")
        for rank, entry in enumerate(report[kind], 1):
            text = (entry["prompt"] + entry["completion"]).replace("\n", " ")
            modules = "; ".join(f"{name} {value:+.2g}" for name, value in entry["top_modules"])
            table.add_row(
                str(rank), f"{entry['score']:+.4g}", entry["id"], str(entry["label"] or ""), text[:160], modules
            )
        out.print(table)
    for entry in report["proponents"]:
        if "tokens" in entry:
            shown = " ".join(f"{tok!r}:{value:+.2g}" for tok, value in entry["tokens"])
            out.print(f"[bold]{entry['id']}[/] by token: {shown}")
