"""Commands on a run directory: ``fit`` (curvature), ``index`` (training gradients), ``scores`` and
``query`` (influence of the training rows on queries)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from wherefrom.cli.app import (
    changed_settings,
    command,
    console,
    fail,
    group_session,
    merged_options,
    progress,
    refuse_foreign_folder,
    refuse_unread_settings,
    remember,
    say,
    settings_as,
    shown_flags,
    stdout_console,
)
from wherefrom.cli.settings import ATTRIBUTION
from wherefrom.core.data import DataError, Record, data_fingerprint, load_records
from wherefrom.core.distributed import PeersLost, barrier, held_by_main, is_main, on_main, refuse
from wherefrom.core.option_pairs import options_for, parse_option_pairs
from wherefrom.core.scoring import Scores, end_kind, end_name, index_rows_text, refuse_folders_in_set, sign_note
from wherefrom.core.search import RowSource, SearchReport, faiss_settings, search_store
from wherefrom.core.store import (
    SETTINGS,
    StoreError,
    check_replacement,
    json_form,
    read_json_object,
    refuse_other_inputs,
    strict_json,
    writer_lock,
)
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run, RunConfig, RunMismatch, refuse_distributed_scores
from wherefrom.methods.registry import in_family, similarity_family
from wherefrom.studies.influence import short_names


def notify(opened: Run) -> None:
    """Print what a writer found and repaired (damaged files rebuilt, unknown partial state discarded)."""
    for notice in opened.notices:
        console.print("[yellow]note:[/]", escape(notice))


@command(uses=(*ATTRIBUTION, "fisher", "reduction", "query_rank", "seed", "autocast", "threads"), distributed=True)
def fit(
    train,
    run,
    model,
    adapter,
    strategy,
    strategy_option,
    method,
    option,
    with_index,
    shard_size,
    dtype,
    device,
    **settings,
) -> None:
    """Fit a method on the training set into RUN (resumes: an existing fit is reused).

    Default: the curvature of --strategy; --method NAME (with --option key=value) fits any method of
    `wherefrom methods`, so that `scores` and `query` score without refitting. --with-index then stores the
    training rows in RUN/index/ (as `wherefrom index`), from the fit's own pass where it kept the per-example
    gradients (K-FAC/EK-FAC). Under `torchrun --nproc_per_node=N` the rows are split over the processes and
    the curvature statistics added (strategies identity, diagonal, kfac, ekfac, exact, datainf); rank 0
    writes RUN."""
    try:
        with group_session():  # first: a rank refused alone would leave the others waiting for the group
            given = changed_settings(("shard_size", "dtype"))
            if given and not with_index:  # recorded in the run's config and replay line, yet read by nothing
                raise ValueError(
                    f"{shown_flags(given)}: the index's layout, which fit uses with --with-index only; add --with-index, "
                    "or give it to `wherefrom index` after the fit"
                )
            paths = {"model": model, "adapter": adapter, "device": device}
            if method is None:
                if option:
                    raise ValueError(
                        f"--option is for --method; give strategy {strategy!r} its options with --strategy-option"
                    )
                refuse_unread_settings(strategy, kind="strategy")
                options = merged_options(strategy_option, strategy, "--strategy-option")
                attribution = settings_as(AttributionConfig, strategy=strategy, strategy_options=options)
                config = RunConfig(train=str(train), attribution=attribution, **paths)
            elif strategy_option:
                raise ValueError(
                    f"--strategy-option is for --strategy; give method {method!r} its options with --option"
                )
            else:
                options = merged_options(option, method)
                refuse_unread_settings(method, options={method: options})
                config = RunConfig.for_method(method, str(train), settings_as(AttributionConfig), options, **paths)
            if with_index and not config.indexable:  # before the run folder is made
                raise ValueError(
                    f"--with-index: method {method!r} has no per-row index (its train side is not a vector per "
                    "row); fit it without --with-index"
                )
            refuse_foreign_folder(run)  # before create writes the run's config.json there
            opened = Run.create(run, config, progress=progress)
            with held_by_main(lambda: writer_lock(run)):  # the config, its replay record and the fit in one hold
                on_main(opened.settle)  # another fit of this folder may have recorded its config since create
                on_main(lambda: remember(run))
                fitted = opened.fit(keep_gradients=with_index)
            barrier()
            written = opened.build_index(shard_size, dtype) if with_index else None
            main = is_main()
    except (DataError, RunMismatch, StoreError, ValueError) as error:
        fail(error)
    if not main:
        return
    notify(opened)
    state = "fitted" if fitted else "already fitted (reused, checksums verified)"
    where = run / ("method" if opened.method is not None else "factors")
    gradients = method is None or not any(in_family(method, family) for family in ("representation", "lexical"))
    modules = f"{len(opened.attributor.modules)} modules, " if gradients else ""  # bm25, repsim track none
    tracin = opened.checkpoint_method()
    if tracin is not None:  # it tracks each checkpoint's modules (e.g. LoRA's), not those of the run's model
        modules = f"{len(tracin.checkpoints)} checkpoints, "
    say(f"{method or strategy} {state}: {modules}{len(opened.train)} rows -> {where}")
    if written is not None:
        print_index_done(run, written)


@command(distributed=True)
def index(run, shard_size, dtype, precondition, optimizer_checkpoint, unit_norm, device, threads) -> None:
    """Store one row per training example in RUN/index/ so that queries need no train pass: the raw
    gradients of an influence run, the projected (optionally preconditioned, unit) gradients of a fitted
    trak/logra run, the hidden states of a repsim run, the learning-rate-scaled gradients of every checkpoint
    of a tracin run (TracInCP as one inner product). --precondition adam divides each training gradient by
    AdamW's saved second moment (LESS). Resumes; refuses other settings than the
    interrupted index was started with, naming them. Under `torchrun --nproc_per_node=N` each process
    builds every N-th shard and rank 0 finishes the store (the same bytes as one process)."""
    try:
        with group_session():
            opened = Run.open(run, progress=progress, device=device, factors=False)
            written = opened.build_index(shard_size, dtype, precondition, unit_norm, optimizer_checkpoint)
            main = is_main()
    except (RunMismatch, StoreError, ValueError) as error:
        fail(error)
    if not main:
        return
    notify(opened)
    print_index_done(run, written)


def print_index_done(run: Path, written: int) -> None:
    """The line that ends a build of RUN/index/, with the layout the store has (its manifest's rows, length, dtype,
    shard size and preconditioning): userD saw an index whose settings were lost rebuilt at the default layout,
    noted, but not which layout it then had."""
    settings = read_json_object(run / "index" / SETTINGS)
    done = "shard" if written == 1 else "shards"
    layout = f"{settings['rows']} rows x {settings['dim']:,} {settings['dtype']}, {settings['shard_size']} rows a shard"
    if "precondition" in settings:
        layout += f", --precondition {settings['precondition']}{' --unit-norm' if settings.get('unit_norm') else ''}"
    say(f"index complete ({written} {done} written now; {layout}) -> {run / 'index'}")


@command(distributed=True)
def scores(
    run, queries, name, top_k, overwrite, search, search_option, prefilter_bm25, no_recall, device, threads
) -> None:
    """Pairwise influence of every training row on every query row; saved under RUN/scores/ (an earlier
    set of the same --name made for other query rows, or with its training side from elsewhere, e.g. before the
    run had an index, is kept unless --overwrite; one for the same rows, by ids and content, and training side is
    recomputed). Under
    `torchrun --nproc_per_node=N` the training rows are split over the processes and rank 0 gathers and writes
    the scores. With --search or --prefilter-bm25: each query's top
    proponents and opponents from the run's vector store instead (printed, nothing saved; one process)."""
    try:
        options = check_search(search, search_option, no_recall)
        if search is None and prefilter_bm25 is None:  # before the process group and the model
            refuse_distributed_scores(Run.recorded_config(run))
        with group_session():
            rows = load_records(queries)
            if search is not None or prefilter_bm25 is not None:
                refuse("scores --search/--prefilter-bm25", "search the index in one process")
                refuse_full_score_flags(("name", "overwrite"))
                search_run(run, rows, top_k, search, options, prefilter_bm25, not no_recall, device)
                return
            saved = list(refuse_folders_in_set(run / "scores", name)[:2])  # a folder there: before the query pass
            queried = {"query_ids": [r.id for r in rows], "query_fingerprint": data_fingerprint(rows)}
            # a finished set is one with its .json (written last): tensors without it are a killed write's
            replaces = (
                not overwrite and saved[1].exists() and check_replacement(saved, saved[1], queried, "--overwrite")
            )
            opened = Run.open(run, progress=progress, device=device)
            if replaces:  # the same query rows: still refused when the training side changed (e.g. now an index)
                check_origin(saved, opened.scores_provenance())
            # a writer of RUN/scores: refuse before the work while another writer runs
            with held_by_main(lambda: writer_lock(run)):
                result = opened.scores(rows)
                path = on_main(lambda: opened.save_scores(result, name, queried["query_fingerprint"], top_k))
            main = is_main()
    except PeersLost:
        raise  # one line and exit 1, as every command gives it (wherefrom.cli.app.command; reviewS: exit 2 here)
    except (DataError, RunMismatch, RuntimeError, ValueError) as error:
        fail(error)
    if not main:
        return
    if replaces:
        console.print(f"[yellow]note:[/] replaced the earlier scores of the same query rows in {escape(str(path))}")
    print_tops(result, top_k, {row.id: row.label for row in opened.train}, opened.similarity)
    say(f"{tuple(result.total.shape)} scores -> {path}")
    say_train_side(opened)


ORIGIN = ("train_side", "store")
"""The keys of a score set's ``provenance`` (:meth:`wherefrom.engine.run.Run.scores_provenance`) that decide its
training side; ``store``, the index's content digest, covers the index's own settings (dtype, precondition)."""
SHOWN_ORIGIN = ("dtype", "index_options")
"""The keys of a score set's ``provenance`` a refusal names for a store that differs, where they do: readable, where
the digest is not (it is named only when they agree: the index rebuilt with the same settings)."""


def check_origin(saved: Sequence[Path], provenance: Mapping[str, object]) -> None:
    """Refuse (:class:`wherefrom.core.store.OutputExists`, pass ``--overwrite``) to replace the score set ``saved``
    (its ``.safetensors`` and ``.json``) of the same query rows when its recorded ``provenance`` differs from
    ``provenance`` in an :data:`ORIGIN` key, e.g. recomputed then and read from an index now (named), or from
    another index (named by its :data:`SHOWN_ORIGIN` keys that differ, else by its digest); a set recorded without
    provenance (before it was recorded) is not compared."""
    recorded = read_json_object(Path(saved[1])).get("provenance")
    if not isinstance(recorded, dict):
        return

    def differs(key: str) -> bool:
        return json_form(recorded.get(key)) != json_form(provenance.get(key))

    differing = [key for key in ORIGIN if differs(key)]
    if "train_side" in differing:  # recomputed then, from an index now (or the reverse): the store says no more
        differing = ["train_side"]
    elif differing:  # the same training side, another index: how it differs, where that is readable
        # a key a set of an earlier version lacks is not named (it kept them elsewhere)
        differing = [key for key in SHOWN_ORIGIN if key in recorded and differs(key)]
        differing = differing or ["store"]
    before, now = ({key: record.get(key) for key in differing} for record in (recorded, provenance))
    refuse_other_inputs(saved, before, now, prefix="provenance")


def refuse_full_score_flags(names: Sequence[str]) -> None:
    """``ValueError`` naming each setting of ``names`` the running command was given off its default: a search
    (``--search``/``--prefilter-bm25``) prints each query's top rows and saves nothing, so a flag about the full
    scores (``--json``, ``--by-module``, ``--per-token``, ``--html``; ``scores``' ``--name``, ``--overwrite``) would
    be ignored."""
    given = changed_settings(names)
    if given:
        raise ValueError(
            f"{shown_flags(given)} {'needs' if len(given) == 1 else 'need'} the full scores, which --search/--prefilter-bm25 do "
            "not compute (they print each query's top rows and save nothing); leave "
            f"{'it' if len(given) == 1 else 'them'} out, or drop --search/--prefilter-bm25"
        )


def check_search(search: str | None, search_option: list[str] | None, no_recall: bool = False) -> dict:
    """The FAISS options of ``--search-option``, checked before any work: ``ValueError`` when they or
    ``--no-recall`` are given without ``--search faiss``, then :class:`wherefrom.core.options.OptionError` for a bad name or value or an
    option the kind does not use (:func:`wherefrom.core.search.faiss_settings`)."""
    got = "no --search" if search is None else f"--search {search}"
    if search_option and search != "faiss":
        raise ValueError(f"--search-option sets FAISS options; it needs --search faiss (got {got})")
    if no_recall and search != "faiss":
        raise ValueError(f"--no-recall skips the recall of an approximate search; it needs --search faiss (got {got})")
    options = options_for(parse_option_pairs(search_option, "--search-option", namespaced=False), "*")
    faiss_settings(options)
    return options


def search_run(
    run: Path,
    queries: list[Record],
    top_k: int,
    search: str | None,
    options: Mapping[str, object],
    prefilter_bm25: int | None,
    recall: bool,
    device: str | None,
    as_json: bool = False,
) -> None:
    """Answer ``scores`` / ``query`` from RUN's vector store (``--search``, ``--prefilter-bm25``; ``recall``: with
    ``--search faiss``, also the exact search and recall@k; a shard is hashed as it is first read, and a damaged
    one stops the search before any result, naming it and the command that rebuilds it): the
    queries in the store's row layout (:meth:`wherefrom.engine.run.Run.query_vectors`), searched by
    :func:`store_search` (a FAISS index kept in ``RUN/index/``, keyed by the store's contents) and printed
    by :func:`print_search`, or with ``as_json`` (``query --json``, one query) as :func:`search_json`. ``options``: the FAISS options its callers parsed with :func:`check_search` before
    any work; a FAISS kind that cannot index the store is refused before the queries are computed. Raises
    ``FileNotFoundError`` naming RUN when it has no finished index."""
    opened = Run.open(run, progress=progress, device=device)
    if not opened.config.indexable:
        raise ValueError(
            f"{run} is a {opened.config.method!r} run: its train side is not a vector per row, so it has no vector "
            f"store to search (--search, --prefilter-bm25); `wherefrom scores --run {run}` scores every row"
        )
    if not opened.has_index():
        started = opened.index_manifest() is not None
        step = opened.resume_advice() if started else f"build it with `{opened.index_command()}`"
        raise FileNotFoundError(
            f"{run} has no {'finished ' if started else ''}vector store of training rows, which --search and "
            f"--prefilter-bm25 search: {step}; without them the run scores every row"
        )
    store = opened.open_index(verify=False)  # each shard is hashed as the search first reads it: read once, not twice
    settings = faiss_settings(options)
    if search == "faiss" and settings.builds_index(prefilter_bm25 is not None):
        settings.check_store(store.count, store.dim)  # before the queries' gradients
    query_ids, vectors = opened.query_vectors(queries, store)
    with opened.rebuild_named():
        report = store_search(
            store, vectors, queries, opened.train, top_k, search, options, prefilter_bm25, store.folder,
            store.content_key(), recall,
        )  # fmt: skip
    if as_json:
        found = search_json(report, opened, queries[0], top_k)
        typer.echo(json.dumps(strict_json(found), indent=2, allow_nan=False))
        console.print(found["search"]["summary"], markup=False, highlight=False)
        return
    print_search(report, query_ids, top_k, {row.id: row.label for row in opened.train}, opened.similarity)


def query_header(opened: Run, record: Record) -> dict:
    """The head of ``query --json``'s report: the query, the run's method and what the sign of a score means
    (:func:`wherefrom.core.scoring.sign_note`)."""
    return {
        "query": {"prompt": record.prompt, "completion": record.completion},
        "strategy": opened.config.method or opened.config.attribution.strategy,
        "sign": sign_note(opened.similarity),
    }


def row_entry(row: Record, score: float, lowest: bool, similarity: str | None = None) -> dict:
    """A training row at one end of ``query --json``'s report (``lowest``: the opponents' end): id, score, its
    kind (:func:`wherefrom.core.scoring.end_kind`; ``similarity``: of a similarity method), label, prompt and
    completion."""
    kind = end_kind(score, lowest, similarity)
    return {
        "id": row.id,
        "score": score,
        "kind": kind,
        "label": row.label,
        "prompt": row.prompt,
        "completion": row.completion,
    }


def search_json(report: SearchReport, opened: Run, record: Record, top_k: int) -> dict:
    """``query --json --search ...``: the report of the full scores (:func:`query_header`, each end's rows as
    :func:`row_entry`; no ``top_modules``: a search scores the store's rows, not each module) and ``search``: its
    mode, seconds, the recall@k of each end against the exact search (FAISS; else ``null``) and the summary line
    (the one printed on stderr). An end a search of candidates found fewer rows for is shorter (no padding)."""
    rows = {row.id: row for row in opened.train}
    ends = {
        kind: [
            row_entry(rows[row_id], score, kind == "opponents", opened.similarity)
            for row_id, score in zip(found.ids[0], found.scores[0].tolist())
            if not math.isnan(score)
        ]
        for kind, found in report.ends()
    }
    recall = None if report.recall is None else [float(end[0]) for end in report.recall]
    summary = report.summary(top_k, opened.similarity)
    search = {"mode": report.mode, "seconds": report.seconds, "recall": recall, "summary": summary}
    return {**query_header(opened, record), **ends, "search": search}


def store_search(
    source: RowSource,
    query_vectors: torch.Tensor,
    queries: list[Record],
    train: list[Record],
    top_k: int,
    search: str | None,
    options: Mapping[str, object] | None,
    prefilter_bm25: int | None,
    folder: Path | None = None,
    store_key: str | None = None,
    recall: bool = True,
) -> SearchReport:
    """The search of ``--search``/``--prefilter-bm25``: top-``top_k`` proponents and opponents of
    ``query_vectors`` ``(n_query, source.dim)`` (the ``queries`` in the store's projection) among the
    store's rows, restricted to each query's top-``prefilter_bm25`` BM25 rows of ``train`` when given
    (:func:`wherefrom.methods.lexical.bm25_candidates`), exact unless ``search`` is ``faiss`` (index
    saved in ``folder``, keyed by ``store_key``: :func:`wherefrom.core.search.build_faiss_index`; ``options``:
    the FAISS options :func:`check_search` parsed; ``recall``: a FAISS search's recall@k against the exact one,
    :func:`wherefrom.core.search.search_store`). ``ValueError`` when ``train`` is not the store's rows in order."""
    candidates = None
    if prefilter_bm25 is not None:
        from wherefrom.methods.lexical import BM25

        if [row.id for row in train] != list(source.ids):
            raise ValueError("--prefilter-bm25: the training rows are not the vector store's rows in order")
        candidates, matched = BM25().fit(train).matched_candidates(queries, prefilter_bm25)
        for query, among, found in zip(queries, candidates, matched):
            if found < len(among):  # said, since the rows that fill the list are not lexically related
                console.print(
                    "[yellow]note:[/]",
                    escape(
                        f"{query.id}: BM25 matched {found} of its {len(among)} candidate rows; the other "
                        f"{len(among) - found} share no word with it (taken in file order)"
                    ),
                )
    return search_store(
        source, query_vectors, top_k, search or "exact", candidates, options, folder, store_key, recall
    )  # fmt: skip


def print_search(
    report: SearchReport,
    query_ids: list[str],
    top_k: int,
    labels: Mapping[str, str | None],
    similarity: str | None = None,
) -> None:
    """Each query's proponents, then its opponents, on stdout (one line each, like :func:`print_tops`, named
    by :func:`end_name`, of a similarity method's scores when ``similarity``; ``none found`` where an approximate search of candidates found none of them), and the
    search's time and recall on stderr."""
    for kind, found in report.ends():
        for query_id, ids, values in zip(query_ids, found.ids, found.scores.tolist()):
            shown = ", ".join(shown_row(i, s, labels) for i, s in zip(ids, values)) or "none found"
            typer.echo(f"{query_id} {end_name(kind, values, similarity)}: {shown}")
    console.print(report.summary(top_k, similarity), markup=False, highlight=False)


def print_tops(result: Scores, top_k: int, labels: Mapping[str, str | None], similarity: str | None = None) -> None:
    """Each query's ``top_k`` proponents on stdout, one query a line: ``query: id [label] (+score), ...``
    (the label only where the training row has one), so the results can be piped apart from the
    progress and paths on stderr. Where some of them are not proponents (score <= 0) the line says so, named by
    :func:`end_name`: ``query highest scores (3 of 3 <= 0, not proponents): ...``; a ``similarity``'s line always
    says ``highest scores``."""
    for q, query_id in enumerate(result.query_ids):
        top = result.top(q, top_k)
        name = end_name("proponents", [score for _, score in top], similarity)
        named = "" if name == "proponents" else f" {name}"
        typer.echo(f"{query_id}{named}: {', '.join(shown_row(i, s, labels) for i, s in top)}")


def shown_row(row_id: str, score: float, labels: Mapping[str, str | None]) -> str:
    """A training row in a printed top list: ``id [label] (+score)`` (the label only where the row has one)."""
    return f"{row_id}{f' [{labels[row_id]}]' if labels.get(row_id) else ''} ({score:+.3g})"


@command
def query(
    prompt,
    completion,
    run,
    top_k,
    as_json,
    by_module,
    per_token,
    html,
    search,
    search_option,
    prefilter_bm25,
    no_recall,
    device,
    threads,
) -> None:
    """Top proponents and opponents of one (prompt, completion) among the training rows (with --search or
    --prefilter-bm25: from the run's vector store)."""
    try:
        record = Record(id="query", prompt=prompt, completion=completion)
        options = check_search(search, search_option, no_recall)
        if search is not None or prefilter_bm25 is not None:
            shown = ("by_module",) if by_module else ()  # --by-module 0 (no modules) is what a search shows
            refuse_full_score_flags((*shown, "per_token", "html"))
            search_run(run, [record], top_k, search, options, prefilter_bm25, not no_recall, device, as_json)
            return
        opened = Run.open(run, progress=progress, device=device)
        refuse_unsplittable_scores(
            opened, [flag for flag, given in (("--per-token", per_token), ("--html", html)) if given]
        )
        result = opened.scores([record])
    except (DataError, RunMismatch, RuntimeError, ValueError) as error:
        fail(error)
    rows = {r.id: r for r in opened.train}
    position = {row_id: i for i, row_id in enumerate(result.train_ids)}
    tokenizer = opened.loaded.tokenizer

    def describe(row_id: str, score: float, lowest: bool) -> dict:
        column = result.per_module[:, 0, position[row_id]]
        order = column.abs().argsort(descending=True)[:by_module].tolist()
        top_modules = [[result.module_names[i], float(column[i])] for i in order]
        return {**row_entry(rows[row_id], score, lowest, opened.similarity), "top_modules": top_modules}

    report = {
        **query_header(opened, record),
        "proponents": [describe(i, s, False) for i, s in result.top(0, top_k)],
        "opponents": [describe(i, s, True) for i, s in result.top(0, top_k, opponents=True)],
    }
    if per_token:  # each listed row's score split over its own tokens and over the query's (both sum to it)
        entries = [*report["proponents"], *report["opponents"]]
        listed = [rows[i] for i in dict.fromkeys(e["id"] for e in entries)]  # a row at both ends: scored once
        _, own = opened.attributor.token_scores([record], listed)
        train_ids, [(_query, query_ids, values)] = opened.attributor.query_token_scores([record], listed)
        split = {row_id: decoded(tokenizer, input_ids, row_values[0]) for row_id, input_ids, row_values in own}
        split_query = {row_id: decoded(tokenizer, query_ids, values[j]) for j, row_id in enumerate(train_ids)}
        for entry in entries:
            entry["tokens"], entry["query_tokens"] = split[entry["id"]], split_query[entry["id"]]
    if html is not None:
        from wherefrom.cli.report import write_query_html

        say(f"query view -> {write_query_html(html, report, result, opened, record)}")
    say_train_side(opened)
    if as_json:
        typer.echo(json.dumps(strict_json(report), indent=2, allow_nan=False))
        return
    print_report(report, result.module_names)


def refuse_unsplittable_scores(opened: Run, flags: Sequence[str]) -> None:
    """``ValueError`` naming ``flags`` (``--per-token``, ``--html``: they split each score over tokens, from the
    gradients recomputed at the run's settings) on a run of a method that is not influence (no per-token gradients:
    ``--html`` ended in a ``KeyError``), and on an influence run whose scores read the training side from an
    ``--precondition adam`` index, whose rows change them: the parts summed to the plain gradient score (4.64)
    beside the adam score shown (43.1)."""
    if not flags:
        return
    if opened.method is not None:
        raise ValueError(
            f"{' and '.join(flags)} {'needs' if len(flags) == 1 else 'need'} an influence method's gradients; this run "
            f"holds {opened.config.method!r}"
        )
    provenance = opened.scores_provenance()
    if (provenance.get("index_options") or {}).get("precondition") == "adam":
        raise ValueError(
            f"{', '.join(flags)} split each score over tokens from the gradients recomputed at the run's settings, but "
            f"its scores come from {opened.folder / 'index'} ({index_rows_text(provenance)}), whose rows change them: "
            f"query without {' and '.join(flags)}, or in a run without that index"
        )


def decoded(tokenizer, input_ids: Sequence[int], values: torch.Tensor) -> list[list]:
    """``[[token text, score part], ...]`` of one row's per-token split (a ``(T,)`` row of
    :meth:`wherefrom.engine.api.Attributor.token_scores` or ``query_token_scores``), as ``query --json`` gives it."""
    return [[tokenizer.decode([t]), float(v)] for t, v in zip(input_ids, values)]


def say_train_side(opened: Run) -> None:
    """Say, on stderr, when ``scores``/``query`` read the training side from RUN/index rather than recomputing it:
    the index's dtype and options (``--precondition``, ``--unit-norm``) then decide the scores, e.g. a
    ``--unit-norm`` index makes a dot-product run's scores cosine-like. The saved scores' ``provenance`` records
    the same (:meth:`wherefrom.engine.run.Run.scores_provenance`); before, nothing on screen said so. Also when an
    unfinished RUN/index (no completion marker) was passed over, with what finishes it."""
    provenance = opened.scores_provenance()
    if provenance["train_side"] != "index":
        if (opened.folder / "index").is_dir() and not opened.has_index():  # it was passed over without a word
            say(
                f"note: {opened.folder / 'index'} is unfinished, so the training side was recomputed; "
                f"{opened.resume_advice()}"
            )
        return
    say(
        f"training side read from {opened.folder / 'index'} ({index_rows_text(provenance)}): its rows, not "
        "gradients recomputed at the run's settings, gave these scores"
    )


def table_title(report: dict, kind: str) -> str:
    """The title of a ``query`` table: the end's :func:`end_name` (of a similarity method's scores when the report's
    ``strategy`` is one), the strategy and the sign convention."""
    similarity = similarity_family(report["strategy"])
    ends = end_name(kind, [entry["score"] for entry in report[kind]], similarity)
    return f"{ends} ({report['strategy']}; {report['sign']})"


def print_report(report: dict, module_names: list[str] | None = None) -> None:
    """The proponent and opponent tables of a ``query`` report on stdout, then each listed row's score by its tokens
    and by the query's (``--per-token``).
    A row's text shows its prompt, then ``->``, then its completion in bold; modules are named without
    the prefix all ``module_names`` share (default: the report's own), one per line."""
    out = stdout_console()
    shown = [name for kind in ("proponents", "opponents") for e in report[kind] for name, _ in e["top_modules"]]
    short = short_names(sorted(set(module_names or shown)))
    for kind in ("proponents", "opponents"):
        table = Table(title=table_title(report, kind), show_lines=True)
        for column in ("rank", "score", "id", "label", "prompt -> completion", "top modules"):
            table.add_column(column, overflow="fold")
        for rank, entry in enumerate(report[kind], 1):
            text = Text(entry["prompt"][-160:].replace("\n", " ") + " -> ")
            text.append(entry["completion"][:160].replace("\n", " "), style="bold")
            modules = "\n".join(f"{short.get(name, name)} {value:+.2g}" for name, value in entry["top_modules"])
            cells = (str(rank), f"{entry['score']:+.4g}", entry["id"], str(entry["label"] or ""))
            table.add_row(*map(Text, cells), text, Text(modules))  # Text: an id or label is shown as written
        out.print(table)
    for entry in [*report["proponents"], *report["opponents"]]:
        for key, side in (("tokens", "its tokens"), ("query_tokens", "the query's tokens")):
            if key in entry:
                shown = " ".join(f"{tok!r}:{value:+.2g}" for tok, value in entry[key])
                out.print(Text.assemble((entry["id"], "bold"), f" ({entry['kind']}) by {side}: {shown}"))
