"""Analysis (b): the bench metric of each method at every saved checkpoint of the fine-tuning.

Does attribution improve, or settle, as training converges? For each seed and each per-epoch
checkpoint ``epoch-k`` of the bench's fine-tuning (``seed-<s>/finetune/checkpoints``), the checkpoint's
model (base model + that epoch's LoRA adapter) is attributed with every chosen method exactly as
``wherefrom bench`` does for the final model (:func:`wherefrom.studies.bench.method_row`: fit, scores, time,
memory, then Acc / Cover / MRR or AUPRC / AUROC / MRR / recall), and the epoch's mean training loss
(``trainer_state.json``) is recorded beside it. TracIn at checkpoint ``k`` sums over checkpoints
``1..k`` (the training seen so far). The last checkpoint holds the final weights, so its row should
equal the bench's own row (a consistency check the report shows next to it).

Cache (resumable): ``seed-<s>/convergence/epoch-<k>-<method>.json``, keyed by the bench settings, the
checkpoint and the method's options.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from wherefrom.core.commandline import command_line
from wherefrom.core.option_pairs import check_methods_named
from wherefrom.models.finetune import read_trainer_state
from wherefrom.studies.analyses.common import Bench, load_checkpoint, method_options, open_bench, write_report
from wherefrom.studies.analyses.ihvp import influence_methods
from wherefrom.studies.bench import BenchConfig, aggregate, method_row, row_key
from wherefrom.studies.benchtasks import BenchTask
from wherefrom.studies.metrics import mean_stat
from wherefrom.studies.toolkit import cached, free_memory, interval_cell, markdown_table, refuse_replacing, store

__all__ = ["ConvergenceSettings", "chosen_methods", "run_convergence"]

NAME = "convergence"
_FORMAT_VERSION = 1


@dataclass
class ConvergenceSettings:
    """``methods``: default the bench's influence methods plus ``repsim``; ``method_options``
    ``{method or "*": {key: value}}`` over the bench's own options."""

    methods: list[str] | None = None
    method_options: dict[str, dict] = field(default_factory=dict)


def chosen_methods(bench: Bench, settings: ConvergenceSettings) -> list[str]:
    """``settings.methods``, or by default the bench's influence methods followed by ``repsim``."""
    return settings.methods or list(dict.fromkeys([*influence_methods(bench.config.methods), "repsim"]))


def _key(bench: Bench, config: BenchConfig, seed: int, epoch: int, method: str, task: BenchTask) -> dict[str, Any]:
    """What an (epoch, method) row depends on: the bench row's key under ``config`` (the bench's, with the
    analysis's methods and options; :func:`wherefrom.studies.bench.row_key`: only the settings the method reads)
    and the epoch."""
    row = row_key(config, seed, method, task, bench.directory)
    return {"row": row, "analysis": NAME, "format": _FORMAT_VERSION, "epoch": epoch}


def run_convergence(
    bench: Bench | str,
    settings: ConvergenceSettings | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run analysis (b) on a bench folder (resuming from its cache); returns what ``convergence.json``
    holds and writes ``convergence.json`` / ``convergence.md`` into the folder.
    ``overwrite=False`` (the default, as ``wherefrom analyze`` without ``--overwrite``): a seed's unit made with other settings is
    refused before that seed's work (:func:`wherefrom.studies.toolkit.refuse_replacing`), not replaced."""
    bench = open_bench(bench)
    settings = settings or ConvergenceSettings()
    say = log or (lambda _line: None)
    methods = chosen_methods(bench, settings)
    check_methods_named(settings.method_options, methods)
    config = replace(
        bench.config,
        methods=methods,
        method_options={m: method_options(bench, settings.method_options, m) for m in methods},
    )
    bench.validate(config)
    epochs = list(range(1, bench.config.epochs + 1))
    rows: list[dict[str, Any]] = []
    for seed in bench.config.seeds:
        task = bench.task(seed)
        path = {(k, m): bench.unit_path(seed, NAME, f"epoch-{k}-{m}") for k in epochs for m in methods}
        keys = {unit: _key(bench, config, seed, *unit, task) for unit in path}
        if not overwrite:
            refuse_replacing((file, keys[unit]) for unit, file in path.items())
        done = {unit: cached(file, keys[unit]) for unit, file in path.items()}
        if any(row is None for row in done.values()):
            loaded, tuned = bench.finetuned(seed, task, say)
            tokenizer, checkpoints = loaded.tokenizer, list(tuned.checkpoints)
            loaded = tuned = None
            if len(checkpoints) != len(epochs):
                raise ValueError(
                    f"seed {seed}: {len(checkpoints)} checkpoints for {len(epochs)} epochs in {bench.folder}"
                )
            for k, checkpoint in zip(epochs, checkpoints):
                todo = [m for m in methods if done[k, m] is None]
                if not todo:
                    continue
                model = load_checkpoint(bench, checkpoint)
                state = SimpleNamespace(model=model, checkpoints=checkpoints[:k])
                loss = read_trainer_state(checkpoint).get("mean_loss")
                for m in todo:
                    row = method_row(config, task, seed, m, state, tokenizer, bench.directory)
                    row.update(epoch=k, train_loss=loss)
                    done[k, m] = store(path[k, m], _key(bench, config, seed, k, m, task), row)
                    say(
                        f"seed {seed} epoch {k} {m}: "
                        + (f"failed: {row['error']}" if row["error"] else f"{row['seconds']:.1f} s")
                    )
                model = state = None
                free_memory()
        else:
            say(f"seed {seed}: reused every row")
        rows += [done[k, m] for k in epochs for m in methods]
    per_epoch = {str(k): aggregate([r for r in rows if r["epoch"] == k], methods) for k in epochs}
    loss = {
        str(k): mean_stat([r["train_loss"] for r in rows if r["epoch"] == k and r["method"] == methods[0]])
        for k in epochs
    }
    final = {m: bench.report.get("aggregate", {}).get(m, {}).get("metrics", {}) for m in methods}
    command = command or command_line("analyze convergence", [("--bench", bench.folder)])
    payload = {
        "command": command,
        "settings": asdict(settings),
        "methods": methods,
        "epochs": epochs,
        "rows": rows,
        "per_epoch": per_epoch,
        "train_loss": loss,
        "bench_final": final,
    }
    write_report(bench, NAME, payload, _markdown(bench, payload))
    return payload


def _markdown(bench: Bench, payload: dict[str, Any]) -> str:
    epochs = payload["epochs"]
    columns = [f"epoch {k}" for k in epochs]
    loss = [
        "training loss (mean over the epoch's steps)",
        *(interval_cell(payload["train_loss"][str(k)]) for k in epochs),
    ]
    lines = [
        f"# wherefrom analyze convergence: {bench.config.task}",
        "",
        f"Command: `{payload['command']}`",
        "",
        (
            "The bench metric of each method on the model of each epoch's checkpoint; mean [95% t interval] over "
            f"seeds ({len(bench.config.seeds)})."
        ),
        "",
        markdown_table(["", *columns], [loss]),
    ]
    for name in bench.metric_names:
        rows = []
        for method in payload["methods"]:
            cells = []
            for k in epochs:
                entry = payload["per_epoch"][str(k)][method]
                cells.append(interval_cell(entry["metrics"].get(name)) if entry["n_ok"] else "failed")
            rows.append([method, *cells, interval_cell(payload["bench_final"][method].get(name))])
        lines += ["", f"## {name}", "", markdown_table(["method", *columns, "bench (final model)"], rows)]
    return "\n".join(lines) + "\n"
