"""Commands of the studies: ``finetune``, ``bench``, ``ablate``, ``analyze``, ``groundtruth``, ``evaluate``,
``tune`` and ``demo``."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import typer

from wherefrom.cli.app import (
    changed_settings,
    command,
    fail,
    leave_unrecorded,
    merged_options,
    method_list,
    method_pairs,
    progress,
    record_only_set,
    recorded_line,
    refuse_foreign_folder,
    refuse_unread_settings,
    remember,
    required,
    say,
    set_settings,
    settings_as,
    shown_flags,
    stdout_console,
)
from wherefrom.cli.settings import (
    NEGATED_FLAGS,
    REFERENCE_FINETUNING,
    REFERENCE_SWITCHES,
    CurvatureSettings,
    int_list,
    output_stem,
    parse_grid,
)
from wherefrom.core.data import DataError, load_records
from wherefrom.core.option_pairs import parse_option_pairs
from wherefrom.core.store import OutputExists, StoreError
from wherefrom.engine.run import RunMismatch
from wherefrom.models.loading import load_model
from wherefrom.studies.finetuning import FIRST_FINETUNING

EVALUATE_METHODS = ("ekfac", "kfac", "datainf", "gradsim", "tracin")
"""What ``evaluate`` scores when ``--methods`` is not given."""

DEMO_SIZES = {"n_train": 160, "n_queries": 10}
"""The demo's generated training rows and held-out queries when ``--n-train`` / ``--n-queries`` are not given."""


@command(uses=(*FIRST_FINETUNING, *REFERENCE_FINETUNING, "weight_decay", "chat_template", "seed", "threads"))
def finetune(train, out, model, full, lora_rank, lora_target, overwrite, device, **settings) -> None:
    """Fine-tune a causal LM on prompt/completion rows (loss on completion tokens only), saving a
    checkpoint per epoch for TracIn and the convergence analysis; an identical earlier run is reused,
    one with other settings or data is kept unless --overwrite; a killed one resumes after its last epoch. A run
    whose loss diverged (not finite), or whose weights end non-finite, is kept as configured and exits 1.

    --out receives adapter/ or model/, checkpoints/epoch-k/, train_log.jsonl, finetune_config.json (and
    resume/epoch-k/ while training)."""
    from wherefrom.models.finetune import FinetuneConfig
    from wherefrom.models.finetune import finetune as run_finetune

    out = required(out, "out")
    try:
        refuse_foreign_folder(out)
        targets = {"lora_targets": lora_target} if lora_target else {}
        rank = None if full else lora_rank
        config = settings_as(FinetuneConfig, lora_rank=rank, **targets)
        config.validate()
        records = load_records(train)
        loaded = load_model(model, device=device)
        result = run_finetune(loaded.model, loaded.tokenizer, records, config, out, progress=True, overwrite=overwrite)
    except (DataError, ValueError, OutputExists) as error:
        fail(error)
    losses = ", ".join(f"{loss:.3f}" for loss in result.epoch_losses)
    state = "reused an identical earlier run" if result.reused else "trained"
    if result.resumed_after:
        state = f"resumed an interrupted identical run after epoch {result.resumed_after} and trained"
    say(f"{state}: mean loss per epoch {losses} -> {result.weights_dir} ({len(result.checkpoints)} checkpoints)")
    problem = result.divergence()
    if problem:  # userK: it exited 0, so a script went on to attribute a model whose every score is NaN
        incomplete([f"{problem}, and rerun with --overwrite"])


PRESET_SETTINGS = (*FIRST_FINETUNING, *REFERENCE_SWITCHES, "damping", "damping_factor")
"""The settings a preset may set; a flag given overrides it (at its default value too)."""
CURVATURE = tuple(f.name for f in fields(CurvatureSettings))
"""The curvature settings: a study's attribution reads them and its fine-tuning none, so one that none of the
study's methods reads is refused (:func:`wherefrom.cli.app.refuse_unread_settings`)."""

OVERRIDES = (*PRESET_SETTINGS, "lora_target")
"""The settings a preset run takes from flags given, and records only then: the preset's, and ``--lora-target``,
which no preset sets (recorded unset, a replayed ``ablate`` held ``lora_targets=None`` in every run)."""


def explicit_bench_settings(options: dict[str, dict[str, Any]]) -> dict:
    """The :class:`wherefrom.studies.bench.BenchConfig` settings the user set (:func:`set_settings`, with
    ``--no-eos`` as ``append_eos`` and ``--lora-target`` as ``lora_targets``) and the ``--option`` pairs
    (``options``, as :func:`wherefrom.cli.app.method_pairs` parsed them) as ``method_options`` (when any)."""
    explicit = set_settings(OVERRIDES)
    for flag, name in NEGATED_FLAGS.items():
        if flag in explicit:
            explicit[name] = not explicit.pop(flag)
    if "lora_target" in explicit:
        explicit["lora_targets"] = explicit.pop("lora_target")
    return {**explicit, "method_options": options} if options else explicit


@command(uses=(*OVERRIDES, "n_train", "n_test", "model", "device", "threads"))
def bench(task, out, methods, seeds, option, preset, lora_target, overwrite, **settings) -> None:
    """Every method on a benchmark task over seeds: metrics with 95% intervals, time and memory.

    --methods defaults to ekfac,kfac,datainf,gradsim,tracin,repsim,bm25 and --seeds to 0. --preset
    reference-study | wherefrom starts from that bundle of settings (wherefrom.studies.presets); a flag
    given overrides it, also at its default value (--fisher true). --out receives bench.json (with the resolved settings),
    bench.md, seed-<s>/<method>.json and config.json (a rerun resumes and adds new methods and seeds; one that
    would replace a row or fine-tuned model made with other settings is refused unless --overwrite)."""
    from wherefrom.studies.bench import DEFAULT_METHODS, BenchConfig, failed_methods, run_bench
    from wherefrom.studies.presets import resolve

    out = required(out, "out")
    if preset is not None:
        record_only_set(OVERRIDES)

    def build() -> BenchConfig:
        chosen = {"out": str(out), "methods": method_list(methods, DEFAULT_METHODS), "seeds": int_list(seeds or "0")}
        pairs = method_pairs(option, chosen["methods"])
        refuse_unread_settings(*chosen["methods"], names=CURVATURE, preset=preset is not None, options=pairs)
        if preset is None:
            settings = {
                "method_options": pairs,
                "lora_targets": lora_target or None,
            }
        else:
            settings = {**resolve(preset, explicit_bench_settings(pairs)), "preset": preset}
        return settings_as(BenchConfig, **chosen, **settings)

    run = functools.partial(run_bench, overwrite=overwrite)
    run_study(out, build, run, "bench.md", lambda report: failed_methods(report["aggregate"]))


def run_study(out, build, run, table: str, failures: Callable[[dict[str, Any]], list[str]]) -> None:
    """Build a study's configuration (``build()``), validate it, record the command in ``out``, run it
    (``run(config, progress=, log=, command=)``) and print ``out/table``; a data, model, setting or memory
    error ends the command (exit 2); ``failures(report)`` (a method that failed on some seed) exit 1 after the
    table (:func:`incomplete`)."""
    try:
        config = build()
        config.validate()
        from wherefrom.studies.toolkit import refuse_foreign_report  # torch: loaded by the command, not the CLI

        refuse_foreign_report(out / Path(table).stem)  # before the work, not only as the tables are written
        remember(out)  # makes the folder, so that a refusal from here on takes it away again
        report = run(config, progress=progress, log=say, command=recorded_line())
    except (DataError, ValueError, RuntimeError) as error:
        fail(error)
    typer.echo((out / table).read_text())
    incomplete(failures(report))


def incomplete(failures: list[str]) -> None:
    """After a study's table (or a fine-tuning's summary): each of ``failures`` (what failed, with its first error)
    as an ``error:`` line on stderr and exit 1, so that a script or CI job sees a result that is not all there (they
    exited 0, also when every method had failed, or the fine-tuning diverged). A study's report keeps the failures; a
    rerun retries them and reuses the rest."""
    for line in failures:
        say(f"error: {line}")
    if failures:
        raise typer.Exit(code=1)


@command(uses=(*OVERRIDES, "n_train", "n_test", "model", "device", "threads"))
def ablate(
    task, out, methods, seeds, option, start, target, n_train, n_test, model, device, overwrite, **settings
) -> None:
    """Which setting flips the study's finding: the study methods under preset --from (default
    reference-study), then with one switch at a time set as in --to (default wherefrom), then under --to;
    the change of Acc/Cover (AUPRC/MRR) per switch and method with 95% intervals over seeds, and how often
    short rows rank top-1.

    --methods defaults to ekfac,gradsim,repsim and --seeds to 0,1,2. Flags given (also at their
    default value) hold in every run. --out receives ablate.json, ablate.md, runs/<run>/ (bench folders), finetunes/ and
    config.json (a rerun resumes; one that would replace a bench row made with other settings is refused unless
    --overwrite)."""
    from wherefrom.studies.ablation import STUDY_METHODS, AblationConfig, run_ablation
    from wherefrom.studies.bench import failed_methods

    out = required(out, "out")
    record_only_set(OVERRIDES)  # the presets --from and --to decide what no flag sets

    def build() -> AblationConfig:
        chosen = method_list(methods, STUDY_METHODS)
        pairs = method_pairs(option, chosen)
        refuse_unread_settings(*chosen, names=CURVATURE, preset=True, options=pairs)
        return AblationConfig(
            task=task,
            out=str(out),
            start=start,
            target=target,
            methods=chosen,
            seeds=int_list(seeds or "0,1,2"),
            n_train=n_train,
            n_test=n_test,
            model=model,
            device=device,
            fixed=explicit_bench_settings(pairs),
        )

    run_study(
        out,
        build,
        functools.partial(run_ablation, overwrite=overwrite),
        "ablate.md",
        lambda report: [
            f"{run}: {line}" for run, summary in report["runs"].items() for line in failed_methods(summary)
        ],
    )


IHVP_ONLY = ("damping", "damping_factor", "reference", "exact_blocks", "cg_tol", "cg_max_iter", "probes")
"""The settings of ``analyze ihvp`` alone (its reference's and the methods' damping)."""


@command(uses=(*IHVP_ONLY, "threads"))
def analyze(kind, bench, methods, option, n_queries, seeds, overwrite, device, **settings) -> None:
    """The reference study's analyses on a bench folder: writes <kind>.json and <kind>.md into it, the tables of
    this command's settings (resumable; units of work are cached per setting, so rerunning an earlier command
    brings its tables back; one that would replace a cached unit of other settings is refused unless --overwrite,
    each seed before its work).

    --methods: ihvp defaults to the bench's influence methods, convergence to those and repsim.
    ihvp's default damping is --damping-factor x the Hutchinson estimate of the mean GGN eigenvalue.
    --n-queries applies to ihvp and weights."""
    from wherefrom.studies.analyses import (
        ANALYSES,
        ConvergenceSettings,
        IhvpSettings,
        open_bench,
        run_convergence,
        run_ihvp,
        run_weights,
    )

    if kind not in ANALYSES:
        fail(ValueError(f"unknown analysis {kind!r}; choose one of {list(ANALYSES)}"))
    if kind == "weights" and (option or methods):
        fail(ValueError("analyze weights takes no --option or --methods (it measures the fine-tuning weight change)"))
    not_read = {"ihvp": (), "convergence": (*IHVP_ONLY, "n_queries")}.get(kind, IHVP_ONLY)
    unread = changed_settings(not_read)
    if unread:  # they were taken, ignored, and recorded in the analysis's command line
        also = "; analyze weights reads --n-queries too" if "n_queries" in unread else ""
        fail(
            ValueError(
                f"analyze {kind} does not read {shown_flags(unread)} (analyze ihvp does{also}): leave "
                f"{'it' if len(unread) == 1 else 'them'} out"
            )
        )
    leave_unrecorded(not_read)  # at their defaults, which the analysis does not use: not in its command line
    chosen = method_list(methods, []) or None
    try:
        folder = open_bench(bench, device, int_list(seeds) if seeds else None)
        remember(bench, f"analyze {kind}")
        if kind == "ihvp":
            run_ihvp(
                folder,
                settings_as(IhvpSettings, methods=chosen, method_options=parse_option_pairs(option)),
                command=recorded_line(),
                log=say,
                overwrite=overwrite,
            )
        elif kind == "convergence":
            run_convergence(
                folder,
                ConvergenceSettings(methods=chosen, method_options=parse_option_pairs(option)),
                command=recorded_line(),
                log=say,
                overwrite=overwrite,
            )
        else:
            run_weights(folder, n_queries=n_queries, command=recorded_line(), log=say, overwrite=overwrite)
    except (DataError, ValueError, RuntimeError) as error:
        fail(error)
    typer.echo((bench / f"{kind}.md").read_text())


@command
def demo(cache, n_train, n_queries, epochs, model, device, threads) -> None:
    """LoRA-fine-tune the default model on a generated task, then attribute held-out queries with EK-FAC
    and identity (default sizes: 160 training rows, 10 queries)."""
    from wherefrom.studies.demo import run_demo

    sizes = {k: v for k, v in (("n_train", n_train), ("n_queries", n_queries)) if v is not None}
    try:
        if cache is not None:
            refuse_foreign_folder(cache)
        run_demo(
            cache=cache, epochs=epochs, model=model, device=device, progress=progress, console=stdout_console(),
            **{**DEMO_SIZES, **sizes},
        )  # fmt: skip
    except (DataError, RunMismatch, StoreError, ValueError) as error:
        fail(error)


@command(
    uses=(
        *FIRST_FINETUNING,
        *REFERENCE_FINETUNING,
        "n_train",
        "n_test",
        "model",
        "alpha",
        "subset_seeds",
        "loo_rows",
        "loo_seeds",
        "pbrf_rows",
        "workers",
        "seed",
        "device",
        "threads",
    )
)
def groundtruth(task, out, lora_rank, lora_target, subsets, pbrf_option, overwrite, **settings) -> None:
    """Ground truth for attribution: retrain on LDS subsets and leave-one-out sets, and PBRF; resumable.

    --out receives groundtruth.json, lds/loo/pbrf.safetensors, model/, jobs/ and config.json. A rerun reuses what
    was made with the same settings and adds new subsets or rows; one that would replace a finished model, job or
    PBRF row made with other settings is refused unless --overwrite."""
    from wherefrom.studies.groundtruth.build import GroundTruthConfig, build_groundtruth

    out = required(out, "out")
    try:
        config = settings_as(
            GroundTruthConfig,
            out=str(out),
            lora_rank=lora_rank,
            lora_targets=lora_target,
            n_subsets=subsets,
            pbrf_options=merged_options(pbrf_option, "*", "--pbrf-option"),
        )
        config.validate()
        remember(out)  # makes the folder, so that a refusal from here on takes it away again
        gt = build_groundtruth(config, progress=progress, log=say, command=recorded_line(), overwrite=overwrite)
    except (DataError, ValueError, RuntimeError) as error:
        fail(error)
    meta = gt.meta
    targets = [
        name
        for name, array in (("LDS", gt.lds_masks), ("LOO", gt.loo_rows), ("PBRF", gt.pbrf_rows))
        if array is not None
    ]
    say(
        f"ground truth ({', '.join(targets)}) for {len(gt.train_ids)} rows x {len(gt.query_ids)} queries in "
        f"{meta['timings']['total_s']:.1f} s -> {out}"
    )
    typer.echo(json.dumps(meta["noise"], indent=2))


@command(files={"out": output_stem})
def evaluate(groundtruth, methods, option, damping, damping_factor, out, overwrite, device, threads) -> None:
    """Score methods against a ground truth: LDS, LOO Pearson/Spearman, PBRF Spearman with intervals, time, memory.

    --methods defaults to ekfac,kfac,datainf,gradsim,tracin. --out is the file stem of the report
    (default GROUNDTRUTH/evaluate): STEM.json, STEM.md; the command is recorded in the config.json
    beside them. Each method's scores and row are kept in GROUNDTRUTH/scores/ and reused; a rerun that would
    replace those of other options or damping is refused unless --overwrite."""
    from wherefrom.studies.groundtruth.build import GroundTruth
    from wherefrom.studies.groundtruth.evaluate import evaluate as run_evaluate

    stem = out if out is not None else groundtruth / "evaluate"
    try:
        chosen = method_list(methods, EVALUATE_METHODS)
        options = method_pairs(option, chosen)
        refuse_unread_settings(*chosen, names=CURVATURE, options=options)
        base = GroundTruth.load(groundtruth, device).config.attribution()
        remember(stem.parent, f"evaluate {stem.name}")
        report = run_evaluate(
            groundtruth,
            chosen,
            options,
            out,
            attribution=replace(base, damping=damping, damping_factor=damping_factor),
            progress=progress,
            log=say,
            command=recorded_line(),
            device=device,
            overwrite=overwrite,
        )
    except (DataError, ValueError, RuntimeError) as error:
        fail(error)
    typer.echo(stem.with_name(stem.name + ".md").read_text())
    incomplete([f"{method}: {row['error']}" for method, row in report["methods"].items() if row["error"]])


@command
def tune(groundtruth, method, grid, option, split_seed, selection_share, out, device, threads) -> None:
    """Pick the damping (and LiSSA / Arnoldi knobs) that maximise LDS on a selection half of the queries;
    report every point's LDS on both halves and the chosen point's held-out LDS.

    --option gives fixed options of every grid point. --out (default GROUNDTRUTH/tune-METHOD) receives
    tune.json, tune.md, points/ and config.json."""
    from wherefrom.studies.groundtruth.tune import tune as run_tune

    method = required(method, "method")  # it said "unknown method None" (userJ)
    folder = out or groundtruth / f"tune-{method}"
    try:
        parsed = parse_grid(grid)
        options = merged_options(option, method)
        remember(folder)  # makes the folder (removed again, when nothing else is there, if tune is refused)
        report = run_tune(
            groundtruth,
            method,
            parsed,
            split_seed=split_seed,
            selection_share=selection_share,
            out=out,
            method_options=options,
            progress=progress,
            log=say,
            command=recorded_line(),
            device=device,
        )
    except (ValueError, RuntimeError) as error:
        fail(error)
    typer.echo((folder / "tune.md").read_text())
    default = [report["default"]] if report["default"].get("grid_point") is None else []  # else one of the points
    failed = [f"point {json.dumps(p['point'])}: {p['error']}" for p in [*report["points"], *default] if p["error"]]
    incomplete(
        failed if report["chosen"] is not None else [*failed, "no grid point gave an LDS on the selection queries"]
    )
