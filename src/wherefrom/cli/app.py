"""Command line: ``wherefrom fit | index | scores | query | attribute | diagnose | finetune | bench | demo``
(and the ground-truth and analysis commands below).

Every command prints where its outputs went; ``--json`` output goes to stdout alone (progress bars
go to stderr), so it can be piped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from tqdm import tqdm

from wherefrom.core.data import DataError, Record, load_records
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run, RunConfig, RunMismatch
from wherefrom.models.loading import ModelLoadError, load_model

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Which training examples made a language model say this?"
)
console = Console(stderr=True, soft_wrap=True)  # unwrapped: paths and messages stay copyable and greppable


def _progress(batches: Iterable, description: str) -> Iterator:
    return iter(tqdm(batches, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True))


def _fail(error: Exception) -> None:
    """Print ``error`` verbatim (brackets in it are not rich markup), then exit 2."""
    console.print("[bold red]error:[/]", escape(str(error)))
    raise typer.Exit(code=2)


def _options(pairs: list[str] | None, flag: str = "--option") -> dict[str, dict]:
    """``method.key=value`` (or ``key=value`` for every method) -> ``{method: {key: value}}``; values parsed as JSON when they parse."""
    parsed: dict[str, dict] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise typer.BadParameter(f"{flag} {pair!r}: expected key=value or method.key=value")
        key, raw = pair.split("=", 1)
        method, _, name = key.rpartition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parsed.setdefault(method or "*", {})[name] = value
    return parsed


RunOption = typer.Option(..., "--run", help="Run directory (created by `fit`).")


@app.command()
def fit(
    train: Path = typer.Option(..., help="Training rows: JSONL, CSV or Parquet with prompt, completion[, id, label]."),
    run: Path = RunOption,
    model: str | None = typer.Option(None, help="Local Hugging Face model folder (default: SmolLM2-135M-Instruct)."),
    adapter: str | None = typer.Option(None, help="PEFT LoRA adapter folder."),
    strategy: str = typer.Option(
        "ekfac", help="identity | diagonal | kfac | ekfac | exact | cg | lissa | arnoldi | datainf"
    ),
    fisher: str = typer.Option("true", help="true (labels sampled from the model) | empirical"),
    damping: float | None = typer.Option(None, help="Absolute damping; default: damping-factor x mean eigenvalue."),
    damping_factor: float = typer.Option(0.1, help="Relative damping per module."),
    include: list[str] | None = typer.Option(None, help="Regex of module names to track (repeatable)."),
    exclude: list[str] | None = typer.Option(None, help="Regex of module names to skip (repeatable)."),
    batch_size: int = typer.Option(8),
    max_length: int = typer.Option(512, help="Longest prompt+completion in tokens; longer rows are an error."),
    chat_template: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat template."),
    reduction: str = typer.Option("sum", help="Training loss over completion tokens: sum | mean."),
    query_rank: int | None = typer.Option(None, help="Low-rank query batching rank (default: full rank)."),
    strategy_option: list[str] | None = typer.Option(
        None, help="Strategy option key=value (JSON value), e.g. max_iter=300, rank=64."
    ),
    seed: int = typer.Option(0),
    device: str | None = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
) -> None:
    """Fit the curvature on the training set (resumes: an existing fit is reused)."""
    try:
        groups = _options(strategy_option, "--strategy-option")
        attribution = AttributionConfig(
            strategy_options={**groups.get("*", {}), **groups.get(strategy, {})},
            strategy=strategy,
            fisher=fisher,
            damping=damping,
            damping_factor=damping_factor,
            include=include or None,  # type: ignore[arg-type]
            exclude=exclude or None,
            batch_size=batch_size,
            max_length=max_length,
            chat_template=chat_template,
            reduction=reduction,
            query_rank=query_rank,
            seed=seed,  # type: ignore[arg-type]
        )
        config = RunConfig(train=str(train), model=model, adapter=adapter, device=device, attribution=attribution)
        opened = Run.create(run, config, progress=_progress)
        fitted = opened.fit()
    except (DataError, ModelLoadError, RunMismatch, ValueError, MemoryError) as error:
        _fail(error)
    state = "fitted" if fitted else "already fitted (reused)"
    console.print(
        f"{strategy} {state}: {len(opened.attributor.modules)} modules, {len(opened.train)} rows -> {run / 'factors'}"
    )


@app.command()
def index(
    run: Path = RunOption,
    shard_size: int = typer.Option(256, help="Rows per shard (an interrupted index resumes at shard granularity)."),
    dtype: str = typer.Option("float32", help="Storage dtype: float32 | bfloat16 | float16."),
    device: str | None = typer.Option(None),
) -> None:
    """Store the training set's per-example gradients so that queries need no train pass."""
    try:
        opened = Run.open(run, progress=_progress, device=device)
        written = opened.build_index(shard_size, dtype)
    except (FileNotFoundError, RunMismatch, ValueError) as error:
        _fail(error)
    console.print(f"index complete ({written} shards written now) -> {run / 'index'}")


@app.command()
def scores(
    run: Path = RunOption,
    queries: Path = typer.Option(..., help="Query rows (same formats as training rows)."),
    name: str = typer.Option("scores", help="Output name under RUN/scores/."),
    top_k: int = typer.Option(5, help="Proponents per query to print."),
    device: str | None = typer.Option(None),
) -> None:
    """Pairwise influence of every training row on every query row; saved under RUN/scores/."""
    try:
        opened = Run.open(run, progress=_progress, device=device)
        result = opened.scores(load_records(queries))
    except (DataError, FileNotFoundError, RunMismatch, RuntimeError, ValueError) as error:
        _fail(error)
    path = opened.save_scores(result, name)
    for q, query_id in enumerate(result.query_ids):
        tops = ", ".join(f"{i} ({s:+.3g})" for i, s in result.top(q, top_k))
        console.print(f"[bold]{query_id}[/]: {tops}")
    console.print(f"{tuple(result.total.shape)} scores -> {path}")


@app.command()
def query(
    prompt: str = typer.Argument(..., help="The query prompt."),
    completion: str = typer.Argument(..., help="The completion whose log-likelihood is attributed."),
    run: Path = RunOption,
    top_k: int = typer.Option(10),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON to stdout."),
    by_module: int = typer.Option(3, help="Show the modules with the largest share for each proponent (0 = none)."),
    per_token: bool = typer.Option(False, help="Split each top row's score over its tokens."),
    html: Path | None = typer.Option(None, help="Also write this query's view as one self-contained HTML file."),
    device: str | None = typer.Option(None),
) -> None:
    """Top proponents and opponents of one (prompt, completion) among the training rows."""
    try:
        opened = Run.open(run, progress=_progress, device=device)
        record = Record(id="query", prompt=prompt, completion=completion)
        result = opened.scores([record])
    except (DataError, FileNotFoundError, RunMismatch, RuntimeError, ValueError) as error:
        _fail(error)
    rows = {r.id: r for r in opened.train}
    index = {row_id: i for i, row_id in enumerate(result.train_ids)}
    tokenizer = opened.loaded.tokenizer

    def describe(row_id: str, score: float) -> dict:
        row = rows[row_id]
        column = result.per_module[:, 0, index[row_id]]
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
        typer.echo(json.dumps(report, indent=2))
        return
    _print_report(report)


def _print_report(report: dict) -> None:
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


@app.command()
def attribute(
    method: str = typer.Option(
        ...,
        help="Method name: see `wherefrom.methods.registry.METHODS` (ekfac, kfac, lissa, cg, arnoldi, datainf, gradsim, gradsim-cosine, tracin, repsim, bm25, trak, logra, ...).",
    ),
    train: Path = typer.Option(..., help="Training rows."),
    queries: Path = typer.Option(..., help="Query rows."),
    out: Path = typer.Option(..., help="Output folder: scores.safetensors, scores.json, config.json."),
    model: str | None = typer.Option(None, help="Local model folder (default: SmolLM2-135M-Instruct)."),
    adapter: str | None = typer.Option(None, help="PEFT LoRA adapter folder."),
    option: list[str] | None = typer.Option(
        None, help="Method option key=value (JSON value), e.g. depth=200, rank=64, checkpoints='[\"a\"]'."
    ),
    damping: float | None = typer.Option(None),
    include: list[str] | None = typer.Option(None, help="Regex of module names to track (repeatable)."),
    batch_size: int = typer.Option(8),
    max_length: int = typer.Option(512),
    device: str | None = typer.Option(None),
    top_k: int = typer.Option(3),
    prefilter: int | None = typer.Option(
        None, help="Score only each query's top-K BM25 candidates (Grosse et al.'s prefilter); others are NaN."
    ),
) -> None:
    """Any method end to end (fit, then score queries against the training rows)."""
    from wherefrom.core.scoring import save_scores
    from wherefrom.core.store import atomic_write_json
    from wherefrom.methods.registry import make_method

    try:
        options = _options(option)
        options = {**options.get("*", {}), **options.get(method, {})}
        config = AttributionConfig(
            damping=damping, include=include or None, batch_size=batch_size, max_length=max_length
        )
        loaded = load_model(model, adapter, device=device)
        train_rows, query_rows = load_records(train), load_records(queries)
        chosen = make_method(method, loaded.model, loaded.tokenizer, config, **options)
        chosen.fit(train_rows)
        if prefilter is not None:
            from wherefrom.methods.lexical import prefiltered_scores

            result = prefiltered_scores(chosen, query_rows, train_rows, prefilter)
        else:
            result = chosen.scores(query_rows, train_rows)
    except (DataError, ModelLoadError, ValueError, RuntimeError, MemoryError, KeyError) as error:
        _fail(error)
    atomic_write_json(
        {
            "method": method,
            "options": options,
            "prefilter": prefilter,
            "train": str(train),
            "queries": str(queries),
            "model": model,
            "adapter": adapter,
            "attribution": config.to_dict(),
        },
        out / "config.json",
    )
    path = save_scores(result, out, "scores")
    for q, query_id in enumerate(result.query_ids):
        console.print(f"[bold]{query_id}[/]: " + ", ".join(f"{i} ({s:+.3g})" for i, s in result.top(q, top_k)))
    console.print(f"{method}: {tuple(result.total.shape)} scores -> {path}")


@app.command()
def diagnose(
    train: Path = typer.Option(..., help="Training rows (keep it small: the exact GGN is formed)."),
    queries: Path = typer.Option(..., help="Query rows."),
    methods: str = typer.Option(
        "ekfac,kfac,diagonal,datainf,cg,lissa,arnoldi,gradsim", help="Comma-separated method names."
    ),
    out: Path = typer.Option(..., help="Output folder for diagnose.json and diagnose.md."),
    model: str | None = typer.Option(None),
    adapter: str | None = typer.Option(None),
    option: list[str] | None = typer.Option(None, help="method.key=value options, e.g. lissa.depth=300."),
    damping: float | None = typer.Option(None, help="One absolute damping for every method and the exact reference."),
    exact_blocks: str = typer.Option("full", help="Exact reference: full (whole GGN) | module (block diagonal)."),
    include: list[str] | None = typer.Option(
        None, help="Regex of module names to track (repeatable); keep the exact GGN small."
    ),
    batch_size: int = typer.Option(8),
    max_length: int = typer.Option(512),
    device: str | None = typer.Option(None),
) -> None:
    """Each method against exact influence: iHVP relative error, rank correlation, time, memory."""
    from wherefrom.studies.diagnose import diagnose as run_diagnosis
    from wherefrom.studies.diagnose import write_report

    try:
        loaded = load_model(model, adapter, device=device)
        config = AttributionConfig(
            damping=damping, include=include or None, batch_size=batch_size, max_length=max_length
        )
        names = [m.strip() for m in methods.split(",") if m.strip()]
        options = _options(option)
        rows, reason = run_diagnosis(
            loaded.model,
            loaded.tokenizer,
            load_records(train),
            load_records(queries),
            names,
            config,
            {n: {**options.get("*", {}), **options.get(n, {})} for n in names},
            exact_blocks,
        )
    except (DataError, ModelLoadError, ValueError, RuntimeError) as error:
        _fail(error)
    context = {
        "command": " ".join(["wherefrom", *sys.argv[1:]]),
        "train": str(train),
        "queries": str(queries),
        "model": model,
        "adapter": adapter,
        "methods": names,
    }
    _, md_path = write_report(rows, reason, out, context)
    Console().print(md_path.read_text())


@app.command()
def finetune(
    train: Path = typer.Option(..., help="Training rows: JSONL, CSV or Parquet with prompt, completion[, id, label]."),
    out: Path = typer.Option(
        ..., help="Output folder: adapter/ or model/, checkpoints/epoch-k/, train_log.jsonl, finetune_config.json."
    ),
    model: str | None = typer.Option(
        None, help="Local Hugging Face base model folder (default: SmolLM2-135M-Instruct)."
    ),
    full: bool = typer.Option(False, "--full", help="Train every parameter instead of a LoRA adapter."),
    lora_rank: int = typer.Option(4, help="LoRA rank (ignored with --full)."),
    lora_alpha: int = typer.Option(8, help="LoRA alpha (scale alpha / rank)."),
    lora_target: list[str] | None = typer.Option(
        None, help="Module name to adapt (repeatable; default q_proj and v_proj)."
    ),
    epochs: int = typer.Option(2),
    learning_rate: float = typer.Option(
        1e-3, help="Constant AdamW learning rate (full fine-tuning of a real model: ~1e-5)."
    ),
    batch_size: int = typer.Option(8),
    max_length: int = typer.Option(256, help="Longest prompt+completion in tokens; longer rows are an error."),
    weight_decay: float = typer.Option(0.0),
    chat_template: bool = typer.Option(False, help="Wrap prompts in the tokenizer's chat template."),
    seed: int = typer.Option(0, help="Seeds LoRA initialisation and the epoch orders."),
    device: str | None = typer.Option(None, help="cpu | cuda (default: cuda when available)."),
) -> None:
    """Fine-tune a causal LM on prompt/completion rows (loss on completion tokens only), saving a
    checkpoint per epoch for TracIn and the convergence analysis; an identical earlier run is reused."""
    from wherefrom.models.finetune import FinetuneConfig
    from wherefrom.models.finetune import finetune as run_finetune

    try:
        config = FinetuneConfig(
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=batch_size,
            max_length=max_length,
            seed=seed,
            lora_rank=None if full else lora_rank,
            lora_alpha=lora_alpha,
            weight_decay=weight_decay,
            chat_template=chat_template,
            **({"lora_targets": list(lora_target)} if lora_target else {}),
        )
        config.validate()
        records = load_records(train)
        loaded = load_model(model, device=device)
        result = run_finetune(loaded.model, loaded.tokenizer, records, config, out, progress=True)
    except (DataError, ModelLoadError, ValueError, MemoryError) as error:
        _fail(error)
    losses = ", ".join(f"{loss:.3f}" for loss in result.epoch_losses)
    state = "reused an identical earlier run" if result.reused else "trained"
    console.print(
        f"{state}: mean loss per epoch {losses} -> {result.weights_dir} ({len(result.checkpoints)} checkpoints)"
    )


@app.command()
def bench(
    task: str = typer.Option(
        ...,
        help="rules | math | backdoor | backdoor-multi | unwanted, or path:<train file>:<test file> (labelled rows).",
    ),
    out: Path = typer.Option(
        ..., help="Output folder: bench.json, bench.md, seed-<s>/<method>.json (a rerun resumes)."
    ),
    methods: str = typer.Option("ekfac,kfac,datainf,gradsim,tracin,repsim,bm25", help="Comma-separated method names."),
    seeds: str = typer.Option("0", help="Comma-separated seeds (task data and fine-tuning)."),
    n_train: int | None = typer.Option(None, help="Training rows (default: the task's)."),
    n_test: int | None = typer.Option(None, help="Test queries (default: the task's)."),
    model: str | None = typer.Option(None, help="Local model folder (default: SmolLM2-135M-Instruct)."),
    epochs: int = typer.Option(2, help="LoRA fine-tuning epochs."),
    learning_rate: float = typer.Option(1e-3, help="LoRA fine-tuning learning rate."),
    lora_rank: int = typer.Option(4),
    batch_size: int = typer.Option(8),
    max_length: int = typer.Option(256),
    device: str | None = typer.Option(None),
    option: list[str] | None = typer.Option(None, help="method.key=value options (JSON value), e.g. repsim.layer=-1."),
) -> None:
    """Every method on a benchmark task over seeds: metrics with 95% intervals, time and memory."""
    from wherefrom.studies.bench import BenchConfig, run_bench

    try:
        config = BenchConfig(
            task=task,
            out=str(out),
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            seeds=[int(s) for s in seeds.split(",") if s.strip()],
            n_train=n_train,
            n_test=n_test,
            model=model,
            epochs=epochs,
            learning_rate=learning_rate,
            lora_rank=lora_rank,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            method_options=_options(option),
        )
        run_bench(config, progress=_progress, log=lambda line: console.print(line, markup=False, highlight=False))
    except (DataError, ModelLoadError, ValueError, RuntimeError, MemoryError) as error:
        _fail(error)
    typer.echo((out / "bench.md").read_text())


@app.command()
def analyze(
    kind: str = typer.Argument(
        ...,
        help="ihvp (iHVP error vs metric) | convergence (metric per epoch) | weights (weight change vs behaviour change).",
    ),
    bench: Path = typer.Option(..., help="Bench folder written by `wherefrom bench` (bench.json, seed-<s>/finetune)."),
    methods: str | None = typer.Option(
        None, help="Comma-separated methods (ihvp: default the bench's influence methods; convergence: those + repsim)."
    ),
    option: list[str] | None = typer.Option(None, help="method.key=value options (JSON value) over the bench's own."),
    damping: float | None = typer.Option(
        None, help="ihvp: one absolute damping (default: damping-factor x Hutchinson mean GGN eigenvalue)."
    ),
    damping_factor: float = typer.Option(0.1, help="ihvp: relative damping of the default rule."),
    reference: str = typer.Option("auto", help="ihvp: exact | cg | auto (exact when the dense GGN fits, else cg)."),
    cg_tol: float = typer.Option(1e-8, help="ihvp: relative residual of the cg reference."),
    cg_max_iter: int = typer.Option(1000, help="ihvp: iterations of the cg reference at most."),
    probes: int = typer.Option(32, help="ihvp: Hutchinson probes of the default damping's trace estimate."),
    n_queries: int | None = typer.Option(None, help="ihvp, weights: the first N test rows only (default: all)."),
    seeds: str | None = typer.Option(None, help="Comma-separated subset of the bench's seeds (default: all)."),
    device: str | None = typer.Option(None, help="cpu | cuda (default: the bench's setting)."),
) -> None:
    """The reference study's analyses on a bench folder: writes <kind>.json and <kind>.md into it (resumable)."""
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
        _fail(ValueError(f"unknown analysis {kind!r}; choose one of {list(ANALYSES)}"))
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    command = " ".join(["wherefrom", *sys.argv[1:]])

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    try:
        folder = open_bench(bench, device, [int(s) for s in seeds.split(",") if s.strip()] if seeds else None)
        if kind == "ihvp":
            settings = IhvpSettings(
                methods=chosen,
                damping=damping,
                damping_factor=damping_factor,
                reference=reference,  # type: ignore[arg-type]
                cg_tol=cg_tol,
                cg_max_iter=cg_max_iter,
                probes=probes,
                n_queries=n_queries,
                method_options=_options(option),
            )
            run_ihvp(folder, settings, command=command, log=say)
        elif kind == "convergence":
            run_convergence(
                folder, ConvergenceSettings(methods=chosen, method_options=_options(option)), command=command, log=say
            )
        else:
            run_weights(folder, n_queries=n_queries, command=command, log=say)
    except (FileNotFoundError, DataError, ModelLoadError, ValueError, RuntimeError, MemoryError) as error:
        _fail(error)
    typer.echo((bench / f"{kind}.md").read_text())


@app.command()
def demo(
    cache: Path | None = typer.Option(
        None, help="Demo folder (default: $WHEREFROM_CACHE/demo or ~/.cache/wherefrom/demo)."
    ),
    n_train: int = typer.Option(160, help="Generated training rows."),
    n_queries: int = typer.Option(10, help="Held-out queries to attribute."),
    epochs: int = typer.Option(2),
    model: str | None = typer.Option(None, help="Local model folder (default: SmolLM2-135M-Instruct)."),
    device: str | None = typer.Option(None),
) -> None:
    """LoRA-fine-tune the default model on a generated task, then attribute held-out queries with EK-FAC and identity."""
    from wherefrom.studies.demo import run_demo

    try:
        run_demo(
            cache=cache,
            n_train=n_train,
            n_queries=n_queries,
            epochs=epochs,
            model=model,
            device=device,
            progress=_progress,
        )
    except (DataError, ModelLoadError, RunMismatch, ValueError) as error:
        _fail(error)


@app.command()
def groundtruth(
    task: str = typer.Option(
        ...,
        help="rules | math | backdoor | backdoor-multi | unwanted, or path:<train file>:<test file> (labelled rows); the test rows are the queries.",
    ),
    out: Path = typer.Option(
        ..., help="Ground-truth folder: groundtruth.json, lds/loo/pbrf.safetensors, model/, jobs/ (a rerun resumes)."
    ),
    n_train: int | None = typer.Option(None, help="Training rows (default: the task's)."),
    n_test: int | None = typer.Option(None, help="Queries (default: the task's)."),
    model: str | None = typer.Option(None, help="Local base model folder (default: SmolLM2-135M-Instruct)."),
    epochs: int = typer.Option(2, help="Fine-tuning epochs of every training run."),
    learning_rate: float = typer.Option(1e-3),
    lora_rank: int = typer.Option(
        4, help="LoRA rank; 0 fine-tunes every weight (e.g. a tiny model from a saved random init)."
    ),
    lora_target: list[str] | None = typer.Option(
        None, help="LoRA target module name (repeatable; default q_proj, v_proj)."
    ),
    batch_size: int = typer.Option(8),
    max_length: int = typer.Option(256),
    alpha: float = typer.Option(0.5, help="LDS subset fraction."),
    subsets: int = typer.Option(32, help="LDS subsets (0: no LDS)."),
    subset_seeds: int = typer.Option(1, help="Training seeds per LDS subset (averaged)."),
    loo_rows: int = typer.Option(16, help="Rows left out one at a time (0: no LOO)."),
    loo_seeds: int = typer.Option(2, help="Training seeds per LOO set and for the full set (averaged)."),
    pbrf_rows: int = typer.Option(0, help="Rows for PBRF on the full-data model (0: none)."),
    pbrf_option: list[str] | None = typer.Option(None, help="PBRFConfig field key=value (JSON value), e.g. steps=200."),
    workers: int = typer.Option(1, help="Parallel retraining processes (each gets cores // workers threads)."),
    seed: int = typer.Option(0, help="Task, subsets, rows and the first training seed."),
    device: str | None = typer.Option(None),
) -> None:
    """Ground truth for attribution: retrain on LDS subsets and leave-one-out sets, and PBRF; resumable."""
    from wherefrom.studies.groundtruth.build import GroundTruthConfig, build_groundtruth

    try:
        config = GroundTruthConfig(
            task=task,
            out=str(out),
            n_train=n_train,
            n_test=n_test,
            model=model,
            epochs=epochs,
            learning_rate=learning_rate,
            lora_rank=lora_rank or None,
            lora_targets=lora_target or None,
            batch_size=batch_size,
            max_length=max_length,
            alpha=alpha,
            n_subsets=subsets,
            subset_seeds=subset_seeds,
            loo_rows=loo_rows,
            loo_seeds=loo_seeds,
            pbrf_rows=pbrf_rows,
            pbrf_options=_options(pbrf_option, "--pbrf-option").get("*", {}),
            workers=workers,
            seed=seed,
            device=device,
        )
        gt = build_groundtruth(
            config,
            progress=_progress,
            log=lambda line: console.print(line, markup=False, highlight=False),
            command=" ".join(["wherefrom", *sys.argv[1:]]),
        )
    except (FileNotFoundError, DataError, ModelLoadError, ValueError, RuntimeError, MemoryError) as error:
        _fail(error)
    meta = gt.meta
    targets = [
        name
        for name, array in (("LDS", gt.lds_masks), ("LOO", gt.loo_rows), ("PBRF", gt.pbrf_rows))
        if array is not None
    ]
    console.print(
        f"ground truth ({', '.join(targets)}) for {len(gt.train_ids)} rows x {len(gt.query_ids)} queries in "
        f"{meta['timings']['total_s']:.1f} s -> {out}"
    )
    typer.echo(json.dumps(meta["noise"], indent=2))


@app.command()
def evaluate(
    groundtruth: Path = typer.Argument(..., help="Ground-truth folder (built by `wherefrom groundtruth`)."),
    methods: str = typer.Option("ekfac,kfac,datainf,gradsim,tracin", help="Comma-separated method names."),
    option: list[str] | None = typer.Option(None, help="method.key=value options (JSON value), e.g. lissa.depth=300."),
    out: Path | None = typer.Option(
        None, help="File stem of the report (default GROUNDTRUTH/evaluate): STEM.json, STEM.md."
    ),
) -> None:
    """Score methods against a ground truth: LDS, LOO Pearson/Spearman, PBRF Spearman with intervals, time, memory."""
    from wherefrom.studies.groundtruth.evaluate import evaluate as run_evaluate

    try:
        run_evaluate(
            groundtruth,
            [m.strip() for m in methods.split(",") if m.strip()],
            _options(option),
            out,
            progress=_progress,
            log=lambda line: console.print(line, markup=False, highlight=False),
            command=" ".join(["wherefrom", *sys.argv[1:]]),
        )
    except (FileNotFoundError, DataError, ModelLoadError, ValueError, RuntimeError, MemoryError) as error:
        _fail(error)
    stem = out if out is not None else groundtruth / "evaluate"
    typer.echo(stem.with_name(stem.name + ".md").read_text())


def _grid(pairs: list[str]) -> dict[str, list]:
    """``key=v1,v2,...`` (values parsed as JSON when they parse, e.g. ``null``, ``0.1``) -> ``{key: [v1, v2, ...]}``."""
    grid: dict[str, list] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or not raw:
            raise typer.BadParameter(f"--grid {pair!r}: expected key=value1,value2,... e.g. damping_factor=0.01,0.1,1")
        if key in grid:
            raise typer.BadParameter(f"--grid key {key!r} given twice")
        values = []
        for text in raw.split(","):
            try:
                values.append(json.loads(text))
            except json.JSONDecodeError:
                values.append(text)
        grid[key] = values
    return grid


@app.command()
def tune(
    groundtruth: Path = typer.Argument(
        ..., help="Ground-truth folder with LDS subsets (built by `wherefrom groundtruth`)."
    ),
    method: str = typer.Option(..., help="Method to tune (ekfac, kfac, cg, lissa, arnoldi, datainf, ...)."),
    grid: list[str] = typer.Option(
        ...,
        help="key=v1,v2,... (repeatable; the grid is their product): damping_factor=0.001,0.01,0.1,1, damping=..., depth=100,500, rank=16,64.",
    ),
    option: list[str] | None = typer.Option(
        None, help="Fixed method option key=value (JSON value) for every grid point."
    ),
    split_seed: int = typer.Option(0, help="Seed of the selection / held-out split of the queries."),
    selection_share: float = typer.Option(
        0.5, help="Share of the queries the choice is made on; the rest are held out."
    ),
    out: Path | None = typer.Option(
        None, help="Output folder (default: GROUNDTRUTH/tune-METHOD): tune.json, tune.md, points/."
    ),
) -> None:
    """Pick the damping (and LiSSA / Arnoldi knobs) that maximise LDS on a selection half of the queries;
    report every point's LDS on both halves and the chosen point's held-out LDS."""
    from wherefrom.studies.groundtruth.tune import tune as run_tune

    try:
        parsed = _grid(grid)
        groups = _options(option)
        run_tune(
            groundtruth,
            method,
            parsed,
            split_seed=split_seed,
            selection_share=selection_share,
            out=out,
            method_options={**groups.get("*", {}), **groups.get(method, {})},
            progress=_progress,
            log=lambda line: console.print(line, markup=False, highlight=False),
            command=" ".join(["wherefrom", *sys.argv[1:]]),
        )
    except (FileNotFoundError, ModelLoadError, ValueError, RuntimeError, MemoryError) as error:
        _fail(error)
    typer.echo(((out or groundtruth / f"tune-{method}") / "tune.md").read_text())


if __name__ == "__main__":  # pragma: no cover
    app()
