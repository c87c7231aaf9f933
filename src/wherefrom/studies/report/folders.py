"""``wherefrom report PATH``: recognise what a result folder (or file) holds and build its report.

Recognised, in this order (folders by their files: :data:`wherefrom.studies.outputs.FOLDER_MARKERS`, the table that
also tells whose output folder a command is given):

* a **query result**: a JSON file as ``wherefrom query --json`` prints it (``query``, ``proponents``);
* a **bench** folder: ``bench.json`` (``wherefrom bench``): metric table and interval plots per method;
* an **ablate** folder: ``ablate.json`` (``wherefrom ablate``): each run's metric table, and the changes
  against the start run per switch and method, with interval plots;
* an **evaluate** report: ``evaluate.json`` (``wherefrom evaluate``), or the ``STEM.json`` file of
  ``evaluate --out STEM``, with the methods' saved scores in
  the ground-truth folder's ``scores/`` when they are there (method agreement);
* a **diagnose** folder: ``diagnose.json`` (``wherefrom diagnose``);
* a **word-order** folder: ``wordorder.json`` (``wherefrom word-order``);
* a **run** folder: ``config.json`` + ``manifest.json`` (``wherefrom fit``), with the score sets under
  ``scores/`` (``wherefrom scores``);
* an **attribute** folder: ``config.json`` + ``scores.safetensors`` (``wherefrom attribute``).

Every report ends with the settings and provenance it found. Raises ``FileNotFoundError`` naming what
was expected when ``PATH`` is none of these, or the result files in it (query or evaluate JSON) to report
one by one when it is a folder holding some.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from wherefrom.core.commandline import command_line
from wherefrom.core.data import DataError, Record, data_fingerprint, load_records
from wherefrom.core.scoring import (
    Scores,
    index_rows_text,
    load_score_set,
    saved_labels,
    score_set_names,
    unfinished_set,
)
from wherefrom.core.store import StoreError, read_json_object, refuse_folder_in_place
from wherefrom.engine.run import lost_record, refuse_files_in_place
from wherefrom.methods.registry import similarity_family
from wherefrom.models.finetune import CONFIG_FILE as FINETUNE_RECORD
from wherefrom.studies.ablation import ABLATION_METRICS, SIGNED, runs_line, short_rows_heading, short_rows_table
from wherefrom.studies.bench import table_metrics
from wherefrom.studies.groundtruth.evaluate import TARGET_TITLES, TARGETS, noise_line
from wherefrom.studies.outputs import marked_commands, recorded_commands
from wherefrom.studies.report import plots
from wherefrom.studies.report.render import render, write_html
from wherefrom.studies.report.sections import (
    agreement_section,
    diagnose_section,
    metric_sections,
    query_sections,
    query_side_tokens,
    query_title,
    scores_sections,
    settings_section,
    word_order_section,
)

NOT_REPORTED = {
    "groundtruth": (
        "groundtruth.json",
        "score methods against it (`wherefrom evaluate {path}`), then report `{path}/evaluate.json`",
    ),
    "tune": ("tune.json", "its table is {path}/tune.md"),
    "finetune": (
        FINETUNE_RECORD,
        "attribute with its weights (`wherefrom fit --model MODEL --adapter {path}/adapter`, or `--model {path}/model` "
        "after a full fine-tuning)",
    ),
}
"""Finished result folders report has no page for, with the result file that marks each and what to do instead (a
folder with that file was called unfinished and sent to ``replay``)."""
PROVENANCE_KEYS = ("command", "versions", "hardware", "format")
"""Keys of a result JSON shown as provenance; the others (``config`` and the like) as settings."""
RESULT_KEYS = ("aggregate", "rows", "methods", "seeds", "summary", "runs", "changes", "short_rows")
"""Keys of a result JSON that hold results (shown in their own sections, not as settings)."""


class ScoreSetLeftOut(UserWarning):
    """A score set the report cannot show (unfinished, or damaged): the report shows the others and says why."""


def score_sets(folder: Path) -> tuple[dict[str, tuple[Scores, dict[str, Any]]], list[str]]:
    """Every score set :func:`wherefrom.core.scoring.save_scores` wrote in ``folder``, by name (sorted): its scores
    and JSON record (:func:`wherefrom.core.scoring.load_score_set`); and why each set it cannot read is left out,
    unfinished (its writer stopped) or damaged (a truncated file: the whole report ended in an error), each also
    said as a :class:`ScoreSetLeftOut` warning (an unfinished one was left out without a word). A JSON beside a
    ``.safetensors`` that is no score set is passed over."""
    finished, unfinished = score_set_names(folder)
    sets, left_out = {}, [unfinished_set(folder, name) for name in unfinished]
    for name in finished:
        try:
            if "train_ids" not in read_json_object(Path(folder) / f"{name}.json"):
                continue
        except ValueError:
            pass  # damaged: named below as influence names it (by its checksum), not as "not valid JSON"
        try:
            sets[name] = load_score_set(folder, name)
        except (StoreError, ValueError, KeyError) as error:
            left_out.append(f"the score set {Path(folder) / name} is damaged: {error}")
    for why in left_out:
        warnings.warn(f"the report leaves out a score set: {why}", ScoreSetLeftOut, stacklevel=2)  # one sentence
    return sets, left_out


def left_out_section(left_out: list[str]) -> list[dict[str, Any]]:
    """A section naming the score sets :func:`score_sets` left out, and why; none when it left out none."""
    if not left_out:
        return []
    notes = [{"type": "note", "text": f"Left out: {why}."} for why in left_out]
    return [{"heading": "Score sets left out", "blocks": notes}]


def _scores_of(named: dict[str, tuple[Scores, dict[str, Any]]]) -> dict[str, Scores]:
    """The scores of :func:`score_sets`' sets, by name."""
    return {name: scores for name, (scores, _record) in named.items()}


def _train_side(record: dict[str, Any]) -> str | None:
    """Where a score set's training side came from, by its saved ``provenance`` (``None`` for a set saved without
    it: ``attribute``, or an older ``scores``)."""
    provenance = record.get("provenance")
    side = provenance.get("train_side") if isinstance(provenance, dict) else None
    if side == "index":
        return (
            f"Training side: read from the run's index ({index_rows_text(provenance)}), not gradients recomputed at "
            "the run's settings."
        )
    return "Training side: recomputed at the run's settings." if side == "recomputed" else None


def _rows(folder: Path, config: dict[str, Any]) -> tuple[dict[str, Record] | None, str]:
    """The training rows by id of the result ``folder`` whose ``config.json`` is ``config`` (its ``train``), or
    ``None`` when there is none or the file is gone or unreadable, with the note saying so (the path tried and
    why). A relative ``train`` (``attribute`` records paths as given) is taken from the directory the command ran
    in, which its replay record keeps relative to ``folder`` (so the report is the same from any directory)."""
    train = config.get("train")
    if not train:
        return None, "The settings name no training file: rows are shown by id."
    records = config.get("replay")
    ran_in = (
        [r["cwd"] for r in records.values() if isinstance(r, dict) and "cwd" in r] if isinstance(records, dict) else []
    )
    path = Path(os.path.normpath(train if Path(train).is_absolute() or not ran_in else folder / ran_in[0] / train))
    try:
        records = load_records(path)
    except (DataError, OSError) as error:  # each names the file
        return None, (
            f"The training rows could not be read ({error}): rows are shown by id. Put the training file back "
            "(or repair it) and report again to see their text."
        )
    if _made_from(folder, config) not in (None, data_fingerprint(records)):  # edited text beside the old scores
        return None, (
            f"The training file {path} changed since these results were made (its rows' fingerprint is not the one "
            "recorded): rows are shown by id. Put back the file they were made from to see their text."
        )
    return {r.id: r for r in records}, ""


def _made_from(folder: Path, config: dict[str, Any]) -> str | None:
    """The fingerprint of the training rows the results in ``folder`` were made from: an ``attribute`` folder's
    ``train_fingerprint`` (its ``config.json``), a run's ``manifest.json`` ``data``; ``None`` where none is recorded."""
    if isinstance(config.get("train_fingerprint"), str):
        return config["train_fingerprint"]
    try:
        data = read_json_object(folder / "manifest.json").get("data") if (folder / "manifest.json").is_file() else None
    except ValueError:
        return None
    return data.get("fingerprint") if isinstance(data, dict) else None


def _provenance(data: dict[str, Any]) -> list[dict[str, Any]]:
    settings = {k: v for k, v in data.items() if k not in PROVENANCE_KEYS and k not in RESULT_KEYS}
    provenance = {k: data[k] for k in PROVENANCE_KEYS if k in data}
    out = [settings_section("Settings", settings)] if settings else []
    return out + ([settings_section("Provenance", provenance)] if provenance else [])


def _scores_report(path: Path, folder: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The sections of the score sets in ``folder`` (:func:`score_sets`) of the run or ``attribute`` folder ``path``
    whose settings are ``config``: their rows' text when the training file is readable, else their saved labels;
    where each set's training side came from, when it was saved; those left out and why; a note when there are
    none."""
    named, left_out = score_sets(folder)
    if not named:
        none = "No scores yet: run `wherefrom scores`." if not left_out else "No score set could be read."
        return [{"heading": "Scores", "blocks": [{"type": "note", "text": none}]}, *left_out_section(left_out)]
    rows, unread = _rows(path, config)
    similarity = similarity_family(config.get("method"))
    sections = []
    for name, (scores, record) in named.items():
        sections += scores_sections(
            name,
            scores,
            rows,
            labels=saved_labels(record),
            unread=unread,
            origin=_train_side(record),
            similarity=similarity,
        )
    together = agreement_section(_scores_of(named))
    return sections + ([together] if together else []) + left_out_section(left_out)


def in_order(per_method: dict[str, Any], methods: list[str]) -> dict[str, Any]:
    """``per_method``'s entries in the order of ``methods`` (a study's ``--methods``; its JSON stores them sorted)."""
    return {m: per_method[m] for m in methods if m in per_method}


def _evaluate_report(path: Path, data: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The report of an ``evaluate`` JSON ``path`` (``data``: its content): named by its folder for the default
    ``evaluate.json``, else by its stem (``--out STEM``)."""
    extra = {"seconds": "time, s", "peak_mib": "peak memory, MiB"}
    methods = in_order(data["methods"], data.get("config", {}).get("methods") or list(data["methods"]))
    # userP: the methods came alphabetically (the JSON's order) and the columns by their keys (lds, loo_pearson)
    section = metric_sections(methods, "Methods against the ground truth", extra, TARGETS, titles=TARGET_TITLES)
    noise = noise_line((data.get("groundtruth") or {}).get("noise"))  # userI: only in evaluate.md
    if noise:
        section["blocks"].insert(1, {"type": "note", "text": noise.strip()})
    sections = [section]
    scores_folder = Path(data.get("config", {}).get("groundtruth", path.parent)) / "scores"
    named, left_out = score_sets(scores_folder)
    together = agreement_section(_scores_of(named))
    name = path.parent.name if path.name == "evaluate.json" else path.stem
    return f"Evaluate: {name}", [
        *sections,
        *([together] if together else []),
        *left_out_section(left_out),
        *_provenance(data),
    ]


def _file_kind(data: dict[str, Any]) -> str | None:
    """What a result JSON file holds: ``"query"`` (``query --json``), ``"evaluate"`` (``evaluate --out STEM``'s
    ``STEM.json``), or ``None``."""
    if "proponents" in data and "query" in data:
        return "query"
    if {"methods", "groundtruth", "config"} <= set(data):
        return "evaluate"
    return None


def _result_files(folder: Path) -> list[Path]:
    """The JSON files directly in ``folder`` that :func:`report_sections` reports on (unreadable ones left out)."""
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            if path.is_file() and _file_kind(read_json_object(path)):
                found.append(path)
        except (ValueError, OSError):
            continue
    return found


def report_sections(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """``(title, sections)`` of the report on ``path`` (see the module docstring for what is recognised)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        data = read_json_object(path)
        kind = _file_kind(data)
        if kind == "query":
            return query_title(data["query"]["prompt"]), query_sections(data, query_tokens=query_side_tokens(data))
        if kind == "evaluate":
            return _evaluate_report(path, data)
    kind = next(iter(marked_commands(path)), None) if path.is_dir() else None
    if kind is not None:
        if kind == "bench":
            data = read_json_object(path / "bench.json")
            extra = {"seconds": "time, s", "peak_mib": "peak memory, MiB"}
            ordered = in_order(data["aggregate"], data["config"]["methods"])
            caption = "mean over seeds [95% t interval, clipped to [0, 1]]"
            kind, sizes = data.get("kind", ""), data.get("sizes") or {}
            rows_used = f"; {sizes['n_train']} training rows, {sizes['n_test']} queries" if sizes else ""
            heading = f"Bench: task {data['config']['task']} ({kind}{rows_used})"  # userI: bench.md's title had them
            section = metric_sections(ordered, heading, extra, table_metrics(kind), caption)
            sections = [section]
            return f"Bench: {path.name}", sections + _provenance(data)
        if kind == "ablate":
            data = read_json_object(path / "ablate.json")
            # userI: the page left out what ablate.md says (what each run changes, the short rows), titled the
            # changes as the metrics and printed them unsigned, in alphabetical order
            names, methods = ABLATION_METRICS[data["kind"]], data["config"]["methods"]
            sections = [
                metric_sections(in_order(data["runs"][run], methods), f"Run {run}", {}, names) for run in data["order"]
            ]
            sections[0]["blocks"].insert(0, {"type": "note", "text": runs_line(data)})
            changes = {
                f"{run}: {method}": {"metrics": data["changes"][run][method]}
                for run in data["order"][1:]
                for method in methods
                if method in data["changes"][run]
            }
            heading = "Change against the start run (paired over seeds; positive: the run's switch raised the metric)"
            sections.append(metric_sections(changes, heading, {}, names, fmt=SIGNED, prefix="Δ "))
            columns, rows = short_rows_table(data)
            table = {"type": "table", "caption": "", "columns": columns, "rows": rows}
            sections.append({"heading": short_rows_heading(data), "blocks": [table]})
            return f"Ablation: {path.name}", sections + _provenance(data)
        if kind == "evaluate":
            return _evaluate_report(path / "evaluate.json", read_json_object(path / "evaluate.json"))
        if kind == "diagnose":
            data = read_json_object(path / "diagnose.json")
            section = diagnose_section(data["rows"], data.get("exact_reference_missing"))
            return f"Diagnose: {path.name}", [section, *_provenance(data)]
        if kind == "word-order":
            data = read_json_object(path / "wordorder.json")
            return f"Word order: {path.name}", [word_order_section(data), *_provenance(data)]
        if kind == "fit":
            refuse_files_in_place(path)  # a file in place of RUN/scores is no "no scores yet"
            config, manifest = read_json_object(path / "config.json"), read_json_object(path / "manifest.json")
            sections = _scores_report(path, path / "scores", config)
            return f"Run: {path.name}", [
                *sections,
                settings_section("Settings", config),
                settings_section("Provenance", manifest),
            ]
        if kind == "attribute":
            config = read_json_object(path / "config.json")
            sections = _scores_report(path, path, config)
            return f"Attribution: {config.get('method', path.name)}", [*sections, settings_section("Settings", config)]
    files = _result_files(path) if path.is_dir() else []
    if files:
        shown = ", ".join(f"`{command_line('report', [(None, str(file))], exact=True)}`" for file in files)
        raise FileNotFoundError(
            f"{path} is a folder holding result files, not a result folder: report one of them ({shown})"
        )
    for command, (result, advice) in NOT_REPORTED.items():
        if path.is_dir() and (path / result).is_file():  # finished: not to be replayed
            raise FileNotFoundError(
                f"{path} is a finished {command} folder ({result}), which report does not read: "
                + advice.format(path=path)
            )
    lost = lost_record(path) if path.is_dir() else None
    if lost is not None:  # userM: named "unfinished", and the replay it advised refused it too
        raise FileNotFoundError(lost)
    recorded = recorded_commands(read_json_object(path / "config.json")) if (path / "config.json").is_file() else []
    if recorded:  # its command recorded itself there and was killed or failed before its result file
        replay = command_line("replay", [(None, str(path))], exact=True)
        raise FileNotFoundError(
            f"{path} is an unfinished {' / '.join(recorded)} folder: its config.json records the command, but its "
            f"result file is not written yet (killed, or it failed?); finish it with `{replay}`, then report it"
        )
    raise FileNotFoundError(
        f"{path} is not a result wherefrom can report on: expected a query JSON (`wherefrom query --json`), an "
        "evaluate JSON (`wherefrom evaluate --out STEM`), or a "
        "folder with bench.json, evaluate.json, diagnose.json, wordorder.json, config.json + manifest.json (a run), "
        "config.json + scores.safetensors (`wherefrom attribute`) or ablate.json (`wherefrom ablate`)"
    )


def write_report(path: Path, out: Path | None = None) -> Path:
    """Write the HTML report on ``path`` to ``out`` (default ``<folder>/report.html``, or ``<file>.html``).
    Raises ``IsADirectoryError`` naming ``out`` when it is a folder, before the report is made."""
    path = Path(path)
    if out is None:
        out = path / "report.html" if path.is_dir() else path.with_suffix(".html")
    refuse_folder_in_place(out)
    plots.new_page()
    title, sections = report_sections(path)
    return write_html(render(title, str(path), sections), out)
