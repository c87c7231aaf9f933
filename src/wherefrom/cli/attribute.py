"""Commands that run methods end to end on rows: ``attribute`` (any method's scores) and ``diagnose``
(each method against exact influence)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from wherefrom.cli.app import (
    command,
    fail,
    merged_options,
    method_list,
    method_pairs,
    progress,
    recorded_line,
    refuse_foreign_folder,
    refuse_unread_settings,
    remember,
    required,
    say,
    settings_as,
)
from wherefrom.cli.run import print_tops
from wherefrom.cli.settings import ATTRIBUTION
from wherefrom.core.commandline import portable
from wherefrom.core.data import DataError, data_fingerprint, load_records
from wherefrom.core.store import OutputExists, read_json_object
from wherefrom.engine.api import AttributionConfig
from wherefrom.models.finetune import warn_layout_mismatch
from wherefrom.models.loading import load_model

DIAGNOSE_METHODS = ("ekfac", "kfac", "diagonal", "datainf", "cg", "lissa", "arnoldi", "gradsim")
"""What ``diagnose`` compares when ``--methods`` is not given."""


def edited_files(config: Path, record: dict[str, Any]) -> str:
    """The files among ``record``'s training and query files whose rows' fingerprint differs from the one
    ``config`` recorded under the same path, as a clause (userI: the refusal named only the two digests)."""
    try:
        saved = read_json_object(config)
    except (OSError, ValueError):
        return ""
    pairs = (("train", "train_fingerprint"), ("queries", "query_fingerprint"))
    files = [record[name] for name, key in pairs if saved.get(name) == record[name] and saved.get(key) != record[key]]
    return f" (the rows of {' and '.join(files)} were edited since these results were made)" if files else ""


@command(uses=(*ATTRIBUTION, "fisher", "reduction", "query_rank", "seed", "autocast", "threads"))
def attribute(
    method, train, queries, out, model, adapter, option, top_k, prefilter, overwrite, device, **settings
) -> None:
    """Any method end to end (fit, then score queries against the training rows).

    --out receives scores.safetensors, scores.json, scores.top.csv and config.json (earlier scores there
    made with other settings or from other rows, by content, are kept unless --overwrite; with the same ones they
    are recomputed)."""
    from wherefrom.core.scoring import refuse_folders_in_set, save_scores
    from wherefrom.core.store import check_replacement, update_json
    from wherefrom.methods.registry import make_method, method_spec, options_in_full, similarity_family

    out, method = required(out, "out"), required(method, "method")
    try:
        refuse_foreign_folder(out)  # before the model loads
        spec = method_spec(method)
        options = spec.check(merged_options(option, method))
        refuse_unread_settings(method, options={method: options})
        config = settings_as(AttributionConfig)
        train_rows, query_rows = load_records(train), load_records(queries)

        record = {
            "method": method,
            "options": options_in_full(method, options),
            "prefilter": prefilter,
            "train": str(train),
            "queries": str(queries),
            "train_fingerprint": data_fingerprint(train_rows),
            "query_fingerprint": data_fingerprint(query_rows),
            "model": model,
            "adapter": adapter,
            "attribution": used_settings(method, config, options),
        }
        if not overwrite:
            try:
                check_replacement(
                    refuse_folders_in_set(out, "scores"),  # the top-k CSV too, which --overwrite replaces as well
                    out / "config.json",
                    record,
                    "--overwrite",  # a command line's words
                    recorded_as=lambda saved: {
                        **saved,
                        "options": recorded_options(method, saved.get("options") or {}),
                    },
                )
            except OutputExists as refused:
                raise OutputExists(f"{refused}{edited_files(out / 'config.json', record)}") from None
        warn_layout_mismatch(adapter or model, config.layout(), spec.settings_read)
        loaded = load_model(model, adapter, device=device)
        chosen = make_method(method, loaded.model, loaded.tokenizer, config, progress, **options)
        chosen.fit(train_rows)
        if prefilter is not None:
            from wherefrom.methods.lexical import prefiltered_scores

            result = prefiltered_scores(chosen, query_rows, train_rows, prefilter)
        else:
            result = chosen.scores(query_rows, train_rows)
    except (DataError, ValueError, RuntimeError, KeyError) as error:
        fail(error)
    out.mkdir(parents=True, exist_ok=True)

    def settings_of_this_run(saved: dict) -> None:  # the replay record of the run before stays until remember
        refuse_foreign_folder(out, saved)  # again, under the file's lock: another command may have come meanwhile
        replay = saved.get("replay", {})
        saved.clear()
        saved.update(record, replay=replay)

    try:
        update_json(out / "config.json", settings_of_this_run)
        remember(out)
    except ValueError as error:
        fail(error)
    labels = {row.id: row.label for row in train_rows}
    similarity = similarity_family(method)
    path = save_scores(result, out, "scores", labels, top_k, similarity=similarity)
    print_tops(result, top_k, labels, similarity)
    say(f"{method}: {tuple(result.total.shape)} scores -> {path}")


def recorded_options(method: str, recorded: Any) -> Any:
    """The options of an ``attribute`` record in the form it records now (:func:`options_in_full`: an older version
    recorded only those given, setting options too); a record that is not an object is compared as it is."""
    from wherefrom.methods.registry import options_in_full

    return options_in_full(method, recorded) if isinstance(recorded, dict) else recorded


def used_settings(method: str, config: AttributionConfig, options: dict) -> dict:
    """The attribution settings ``method`` ran with, as saved in ``config.json``: the method's own
    (gradsim's ``identity`` strategy, datainf's empirical Fisher) over the command's, and no curvature
    strategy for a method that preconditions with none of them (bm25, repsim, tracin, trak, logra)."""
    from wherefrom.methods.registry import method_settings, method_spec

    used = method_settings(method, config, options)[0].to_dict()
    if "strategy" not in method_spec(method).settings:
        del used["strategy"], used["strategy_options"]
    return used


@command(uses=(*ATTRIBUTION, "fisher", "threads"))
def diagnose(train, queries, methods, out, model, adapter, option, exact_blocks, device, **settings) -> None:
    """Each method against exact influence: iHVP relative error, rank correlation, time, memory.

    Keep the training rows and the tracked modules few (--include): the exact GGN is formed. Every
    method and the exact reference use one absolute damping: --damping, else --damping-factor x the
    mean eigenvalue of the exact GGN; under --fisher empirical the reference is the exact empirical Fisher
    instead. --methods defaults to
    ekfac,kfac,diagonal,datainf,cg,lissa,arnoldi,gradsim. --out receives diagnose.json, diagnose.md
    and config.json."""
    from wherefrom.core.memory import MemoryLimitError, format_bytes, memory_limit
    from wherefrom.studies.diagnose import check_shared_settings, reference_bytes, write_report
    from wherefrom.studies.diagnose import diagnose as run_diagnosis
    from wherefrom.studies.toolkit import refuse_foreign_report

    out = required(out, "out")
    names = method_list(methods, DIAGNOSE_METHODS)
    try:
        refuse_foreign_folder(out)
        refuse_foreign_report(out / "diagnose")  # before the work, not only as the tables are written
        options = method_pairs(option, names)
        check_shared_settings(options, source="--option")  # before the model loads
        config = settings_as(AttributionConfig)
        warn_layout_mismatch(adapter or model, config.layout())  # the exact reference reads every layout setting
        loaded = load_model(model, adapter, device=device)
        train_rows, query_rows = load_records(train), load_records(queries)
        needed = reference_bytes(loaded.model, loaded.tokenizer, train_rows, config, exact_blocks)
        allowed, source = memory_limit(next(loaded.model.parameters()).device)
        limit = f"{format_bytes(allowed)} ({source})" if allowed is not None else f"unknown ({source})"
        say(f"exact reference ({exact_blocks} GGN): {format_bytes(needed)} predicted; memory limit {limit}")
        if allowed is not None and needed > allowed:
            raise MemoryLimitError(
                f"diagnose: the exact reference would need {format_bytes(needed)}, over the limit of {limit}; track "
                r"a few modules (e.g. --include 'layers\.0\.'), use --exact-blocks module, or give fewer --train rows"
            )
        remember(out)  # makes the folder, so that a refusal from here on takes it away again
        rows, reason = run_diagnosis(
            loaded.model,
            loaded.tokenizer,
            train_rows,
            query_rows,
            names,
            config,
            options,
            exact_blocks,
            progress,
        )
        context = {
            "command": recorded_line(),
            "train": portable(str(train)),
            "queries": portable(str(queries)),
            "model": model and portable(model),
            "adapter": adapter and portable(adapter),
            "methods": names,
        }
        _, md_path = write_report(rows, reason, out, context)
    except (DataError, ValueError, RuntimeError) as error:
        fail(error)
    typer.echo(md_path.read_text())
