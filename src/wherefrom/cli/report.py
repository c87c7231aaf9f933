"""``wherefrom report PATH``, the HTML view of ``wherefrom query --html`` and ``wherefrom influence``.

The first two write one self-contained HTML file (:mod:`wherefrom.studies.report`): it opens without
network access, styles and SVG figures inline, no script. ``influence`` writes the same tail and layer
tables as Markdown + JSON (:mod:`wherefrom.studies.influence_tables`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import typer

from wherefrom.cli.app import command, fail, recorded_line, refuse_foreign_folder
from wherefrom.cli.run import decoded
from wherefrom.cli.settings import output_file
from wherefrom.core.data import Record
from wherefrom.core.scoring import Scores, load_scores, score_set_names, unfinished_set
from wherefrom.core.store import StoreError, read_json_object, writer_lock
from wherefrom.engine.run import Run, refuse_files_in_place
from wherefrom.methods.registry import similarity_family
from wherefrom.studies.influence_tables import influence_markdown, influence_tables
from wherefrom.studies.report import plots, render, write_html, write_report
from wherefrom.studies.report.sections import (
    query_sections,
    query_side_rows,
    query_side_tokens,
    query_title,
    settings_section,
)
from wherefrom.studies.toolkit import write_report as write_tables


@command(files={"out": output_file})
def report(path, out, threads) -> None:
    """One self-contained HTML report (no network needed to open it) of a result folder or query JSON;
    --out is the HTML file (default: PATH/report.html, or for a file PATH with .html as its suffix)."""
    try:
        written = write_report(path, out)
    except (StoreError, ValueError, KeyError) as error:  # a damaged score set was a traceback
        fail(error)
    typer.echo(f"report -> {written}")


@command
def influence(run, name, top_k, out, threads) -> None:
    """Grosse et al.'s tail and layer tables of the scores RUN/scores/NAME (top-1%/10% shares, power-law fit,
    shares of |influence| by layer and module type for all rows and the --top-k proponents); --out
    receives influence.json and influence.md (default: RUN/analyses/NAME; an --out inside RUN is written under
    RUN's writer lock, so it is refused while `fit`, `index` or `scores` writes RUN)."""
    try:
        recorded = Run.recorded_config(run)  # a folder that is not a run is named as such, not as one without sets
    except (FileNotFoundError, ValueError) as error:
        fail(error)
    family = similarity_family(recorded.method)
    if family is not None:  # reviewV: layer tables of "|influence|" over the "top proponents" of a similarity
        fail(
            f"{run} is a {recorded.method!r} run: its scores are a {family} similarity, not influence, so they have no "
            f"influence by layer or tail to analyse; `wherefrom report {run}` shows their highest and lowest rows"
        )
    refuse_files_in_place(run)
    folder = run / "scores"
    finished, unfinished = score_set_names(folder)
    if name in unfinished:
        fail(
            f"--name {name!r}: {unfinished_set(folder, name)}; rerun that `wherefrom scores --run {run} ... --name {name}`"
        )
    if name not in finished:
        others = f"; unfinished: {unfinished}" if unfinished else ""
        fail(
            f"--name {name!r}: no score set {folder / name}.safetensors/.json (run `wherefrom scores`); "
            f"finished sets: {finished}{others}"
        )
    out = out or run / "analyses" / name
    # a writer of the run folder (the default --out) holds its writer lock: a writer starting meanwhile would
    # take the temporary files of these writes for a killed writer's leftovers, and delete them
    inside = out.resolve().is_relative_to(run.resolve())
    if not inside:
        try:
            refuse_foreign_folder(out)
        except ValueError as error:
            fail(error)
    started = time.perf_counter()
    try:
        with writer_lock(run) if inside else contextlib.nullcontext():
            scores = load_scores(folder, name)
            payload = influence_tables(scores, top_k)
            payload.update(command=recorded_line(), seconds=time.perf_counter() - started)
            title = f"Influence analyses of {run.name}/scores/{name}"
            paths = write_tables(out / "influence", payload, influence_markdown(payload, title))
    except (StoreError, ValueError) as error:
        fail(error)
    typer.echo(paths[1].read_text(encoding="utf-8"))


def write_query_html(out: Path, result: dict[str, Any], scores: Scores, opened: Run, record: Record) -> Path:
    """The query view of ``wherefrom query``: ``result`` (its JSON report), with token heatmaps on the
    training side for every shown row and on the query side for the top :data:`wherefrom.studies.report.sections.QUERY_SIDE_ROWS`
    proponents, the query's layer profile and tail (from ``scores``), the run's settings and provenance. Token splits
    that ``result``'s entries already hold (``tokens``, ``query_tokens``: ``query --per-token``) are shown as they
    are, not computed again."""
    plots.new_page()
    tokenizer = opened.loaded.tokenizer
    rows = {r.id: r for r in opened.train}
    shown = {kind: [dict(entry) for entry in result[kind]] for kind in ("proponents", "opponents")}
    entries = shown["proponents"] + shown["opponents"]
    # a row among both the proponents and the opponents (a set of fewer than 2 x top-k rows) is scored once: the
    # rows were passed as given and refused as a duplicate id, a traceback
    needed = [rows[i] for i in dict.fromkeys(e["id"] for e in entries if "tokens" not in e)]
    if needed:
        _, per_row = opened.attributor.token_scores([record], needed)
        tokens = {row_id: decoded(tokenizer, input_ids, values[0]) for row_id, input_ids, values in per_row}
        for entry in entries:
            entry.setdefault("tokens", tokens.get(entry["id"]))
    top = query_side_rows(shown["proponents"])  # proponents alone
    query_tokens = query_side_tokens(shown)
    if len(query_tokens) < len(top):
        train_ids, query_side = opened.attributor.query_token_scores([record], [rows[e["id"]] for e in top])
        _query_id, input_ids, values = query_side[0]
        query_tokens = [{"id": i, "tokens": decoded(tokenizer, input_ids, values[j])} for j, i in enumerate(train_ids)]
    sections = query_sections({**result, **shown}, scores, query_tokens)
    sections.append(settings_section("Settings", opened.config.to_dict()))
    manifest = opened.folder / "manifest.json"
    if manifest.is_file():
        sections.append(settings_section("Provenance", read_json_object(manifest)))
    return write_html(render(query_title(record.prompt), str(opened.folder), sections), out)
