"""Every command-line setting, declared once: option groups as dataclasses whose fields carry the help,
the allowed values and the check of each flag.

A command names the settings it takes as its parameters (see :func:`wherefrom.cli.app.command`);
each parameter then gets the flag ``--field-name`` (or the field's ``flag``), the field's type,
default and help, and is shown in ``--help`` under its group's title. So a flag has one name, one
default and one help text in every command, and one check that runs before a command writes
anything (:func:`check_arguments`).

Settings map onto the saved configurations by name: ``AttributionConfig``, ``RunConfig``,
``BenchConfig``, ``GroundTruthConfig``, ``FinetuneConfig``, ``IhvpSettings`` keep their fields; a
command builds them from these values. A setting's default is read from the configuration (or module constant)
that declares it; where a domain configuration has another default the command line passes its own value, so the
command line has one default per meaning (the longest row is one constant, ``wherefrom.core.encoding.MAX_LENGTH``:
``BenchConfig.max_length`` was 256 for Python callers, 512 on the command line).
"""

from __future__ import annotations

import math
import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from wherefrom.core.distributed import available_cores
from wherefrom.core.encoding import LOSS_TOKENS, check_template
from wherefrom.core.option_pairs import OptionPairError, parse_option_pairs, parse_value
from wherefrom.core.options import int64_problem
from wherefrom.core.scoring import TOP_K
from wherefrom.core.search import FAISS_OPTIONS
from wherefrom.core.store import file_in_the_way, read_json_object, replaceable
from wherefrom.core.task import REDUCTIONS
from wherefrom.core.vectors import DTYPE, DTYPES, SHARD_SIZE
from wherefrom.curvature.base import DAMPING_FACTOR, unused_damping_factor
from wherefrom.curvature.exact import BLOCKS
from wherefrom.engine.api import FISHERS, AttributionConfig
from wherefrom.engine.run import PRECONDITION, PRECONDITIONS
from wherefrom.models.finetune import LR_SCHEDULES, FinetuneConfig
from wherefrom.models.loading import adapter_folder_problem, device_here, model_folder_problem
from wherefrom.studies.analyses.ihvp import REFERENCES, IhvpSettings
from wherefrom.studies.diagnose import EXACT_BLOCKS
from wherefrom.studies.finetuning import LATER_FINETUNING
from wherefrom.studies.groundtruth.build import GroundTruthConfig
from wherefrom.studies.groundtruth.tune import SELECTION_SHARE, SPLIT_SEED
from wherefrom.studies.outputs import recorded_commands
from wherefrom.studies.toolkit import seeds_problem
from wherefrom.studies.wordorder import WordOrderConfig

__all__ = [
    "ATTRIBUTION",
    "FLAG_OF_FIELD",
    "GROUPS",
    "NEGATED_FLAGS",
    "SETTINGS",
    "CurvatureSettings",
    "DataSettings",
    "DeviceSettings",
    "FinetuneSettings",
    "GroundTruthSettings",
    "MethodSettings",
    "ModelSettings",
    "OutputSettings",
    "PresetSettings",
    "ScoringSettings",
    "SearchSettings",
    "Setting",
    "StudySettings",
    "TrackingSettings",
    "check_arguments",
    "contradictions",
    "default_threads",
    "int_list",
    "parse_grid",
]

REQUIRED = ...
"""Default of a setting the user must give."""

Check = Callable[[Any], str | None]
"""A check of one value: ``None`` when valid, else what is wrong (the flag and value are added)."""


def setting(
    default: Any,
    help: str,
    *,
    check: Check | None = None,
    flag: str | None = None,
    argument: bool = False,
    per_process: bool = False,
) -> Any:
    """A dataclass field carrying a command-line setting: its default, help, check, flag (default
    ``--field-name``), whether it is a positional argument, and whether each process of a ``torchrun`` group may
    set it for itself (``per_process``: its device, its threads; every other setting must agree)."""
    metadata = {"help": help, "check": check, "flag": flag, "argument": argument, "per_process": per_process}
    return field(default=default, metadata=metadata)


# --- checks -------------------------------------------------------------------------------------
def positive(value: Any) -> str | None:
    """A number (when given) must be finite and > 0 (a damping: ``(G + 0 I)`` has no inverse where ``G`` is singular)."""
    if value is None or (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        return None
    return f"must be a finite number > 0, got {value}"


def at_least(minimum: float) -> Check:
    """Numbers (or each number of a list) must be finite and ``>= minimum``."""

    def check(value: Any) -> str | None:
        values = value if isinstance(value, list) else [value]
        low = [v for v in values if not (math.isfinite(v) and v >= minimum)]  # nan and inf were let through
        if not low:
            return None
        return f"must be {'' if math.isfinite(low[0]) else 'a finite number '}>= {minimum:g}, got {low[0]}"

    return check


def one_of(*allowed: str) -> Check:
    """The value must be one of ``allowed``."""

    def check(value: Any) -> str | None:
        return None if value in allowed else f"unknown value; choose one of {', '.join(allowed)}"

    return check


def existing_path(value: Any) -> str | None:
    """A file or folder that exists."""
    return None if Path(value).exists() else f"no such file or folder: {value}"


def output_folder(value: Any) -> str | None:
    """A folder to write in or read from (made where missing): neither it nor a folder above it is a file (it failed
    after the model loaded, or with a bare ``File exists``)."""
    return file_in_the_way(Path(value), Path(value))


def output_file(value: Any) -> str | None:
    """An HTML report to write (``report --out``, ``query --html``): not a folder (it failed once its content was
    made, ``Is a directory``), no folder above it is a file, and an existing file is a wherefrom report
    (:data:`wherefrom.studies.report.render.GENERATOR`), which is replaced; another file (``--out notes.txt``) was
    replaced and lost."""
    from wherefrom.studies.report.render import GENERATOR

    if os.path.isdir(value):
        return "is a folder, not a file"
    if not replaceable(Path(value), GENERATOR):
        return "is a file wherefrom did not write (not a wherefrom HTML report): choose another file, or remove it"
    return file_in_the_way(Path(value).parent, Path(value))


def output_stem(value: Any) -> str | None:
    """A file stem of ``evaluate``'s report (``STEM.json``, ``STEM.md`` are written, replacing an earlier report; a
    folder named ``STEM`` is left beside them): neither file is a folder or a file wherefrom did not write
    (:data:`wherefrom.studies.groundtruth.evaluate.REPORT_MARKS`, by the rule its writing checks again:
    :func:`wherefrom.studies.toolkit.foreign_report`), and no folder above them is a file."""
    from wherefrom.studies.groundtruth.evaluate import REPORT_MARKS
    from wherefrom.studies.toolkit import foreign_report

    return foreign_report(Path(value), REPORT_MARKS) or file_in_the_way(Path(value).parent, Path(value))


def groundtruth_folder(value: Any) -> str | None:
    """A folder built by ``wherefrom groundtruth`` (it holds ``groundtruth.json``); one whose ``config.json`` records a
    ``groundtruth`` command without it is named as unfinished, with the command that finishes it."""
    if (Path(value) / "groundtruth.json").is_file():
        return None
    if not Path(value).exists():  # userF: named "not a ground-truth folder (no groundtruth.json)"
        return "no such folder"
    try:
        started = "groundtruth" in recorded_commands(read_json_object(Path(value) / "config.json"))
    except (OSError, ValueError):
        started = False
    if started:
        return f"an unfinished ground truth (no groundtruth.json yet): finish it with `wherefrom replay {value}`"
    return "not a ground-truth folder (no groundtruth.json)"


def replay_folder(value: Any) -> str | None:
    """A folder whose ``config.json`` records commands (written by :func:`wherefrom.cli.app.remember`)."""
    missing = existing_path(value)
    if missing is not None:
        return missing
    path = Path(value) / "config.json"
    if not path.is_file():
        from wherefrom.engine.run import lost_record  # on this error path only: it loads the engine

        lost = lost_record(Path(value))  # a run's results without their config.json: named, not "not a folder"
        return lost or "no config.json here: not an output folder of wherefrom"
    try:
        return None if read_json_object(path).get("replay") else "its config.json records no command to replay"
    except ValueError as error:  # userC: a list there was "'list' object has no attribute 'get'"
        return str(error)


def regexes(value: Any) -> str | None:
    """Each value a valid Python regular expression."""
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            return f"invalid regular expression {pattern!r}: {error}"
    return None


def int_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``ValueError`` unless every comma-separated item is an integer."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        return [int(item) for item in items]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def seed_list(value: Any) -> str | None:
    """Comma-separated seeds as a study takes them (:func:`wherefrom.studies.toolkit.seeds_problem`)."""
    try:
        return seeds_problem(int_list(value))
    except ValueError as error:
        return str(error)


def pair_problem(value: Any, namespaced: bool = True) -> str | None:
    """What is wrong with the ``key=value`` (``namespaced``: or ``method.key=value``) pairs ``value``
    (:func:`wherefrom.core.option_pairs.parse_option_pairs`), or ``None``."""
    try:
        parse_option_pairs(value, namespaced=namespaced)
    except OptionPairError as error:
        return error.problem
    return None


def option_pairs(value: Any) -> str | None:
    """``key=value`` or ``method.key=value`` pairs."""
    return pair_problem(value)


def field_pairs(value: Any) -> str | None:
    """``key=value`` pairs of one thing's fields (no ``method.`` prefix)."""
    return pair_problem(value, namespaced=False)


def parse_grid(pairs: list[str]) -> dict[str, list]:
    """``["damping_factor=0.01,0.1"]`` -> ``{"damping_factor": [0.01, 0.1]}`` (values parsed as JSON when they
    parse, e.g. ``null``); ``ValueError`` naming the pair when it is not ``key=value1,value2,...`` or a key repeats."""
    grid: dict[str, list] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key or not raw:
            raise ValueError(f"--grid {pair!r}: expected key=value1,value2,... e.g. damping_factor=0.01,0.1,1")
        if key in grid:
            raise ValueError(f"--grid key {key!r} given twice")
        grid[key] = [parse_value(text) for text in raw.split(",")]
    return grid


def grid_pairs(value: Any) -> str | None:
    try:
        parse_grid(value)
    except ValueError as error:
        return str(error).split(": ", 1)[-1]
    return None


def method_names(value: Any) -> str | None:
    """Comma-separated names of methods in :data:`wherefrom.methods.registry.METHODS`."""
    from wherefrom.methods.registry import check_methods

    try:
        check_methods([m.strip() for m in value.split(",") if m.strip()])
    except ValueError as error:
        return str(error)
    return None


def strategy_name(value: Any) -> str | None:
    """A curvature strategy in :data:`wherefrom.curvature.STRATEGIES`."""
    from wherefrom.curvature import STRATEGIES

    return None if value in STRATEGIES else f"unknown strategy; choose one of {', '.join(sorted(STRATEGIES))}"


def template_text(value: Any) -> str | None:
    """A row template: ``{prompt}`` once and ``{completion}`` at the end (:func:`wherefrom.core.encoding.check_template`)."""
    try:
        check_template(value)
    except ValueError as error:
        return str(error)
    return None


def fraction(value: Any) -> str | None:
    """A number in ``[0, 1)``."""
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


def open_fraction(value: Any) -> str | None:
    """A number in ``(0, 1)``: a share of which both parts are non-empty."""
    return None if 0 < value < 1 else f"must be in (0, 1), got {value}"


def score_set_name(value: Any) -> str | None:
    """A score set's name (:func:`wherefrom.core.scoring.set_name_problem`)."""
    from wherefrom.core.scoring import set_name_problem

    return set_name_problem(value)


def preset_name(value: Any) -> str | None:
    """A preset in :data:`wherefrom.studies.presets.PRESETS`."""
    from wherefrom.studies.presets import PRESETS

    return None if value in PRESETS else f"unknown preset; choose one of {', '.join(sorted(PRESETS))}"


def default_threads() -> int:
    """Torch CPU threads when ``--threads`` is not given: the cores this process may run on
    (``os.sched_getaffinity``) minus the current 1-minute load average, at least 1.

    Oversubscribed cores are slow: measured on 2 shared cores with another job on one of them, a
    tiny-model ``fit`` ran at 0.85 batches/s with torch's default of 2 threads and 29 with 1.
    """
    cores = available_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, int(cores - load))


# --- groups -------------------------------------------------------------------------------------
@dataclass
class ModelSettings:
    """Model: the model attributed or fine-tuned."""

    model: str | None = setting(
        None, "Local Hugging Face model folder (default: SmolLM2-135M-Instruct).", check=model_folder_problem
    )
    adapter: str | None = setting(None, "PEFT LoRA adapter folder on top of --model.", check=adapter_folder_problem)


@dataclass
class DataSettings:
    """Data: rows and how they are tokenized and batched."""

    train: Path = setting(
        REQUIRED,
        "Training rows: JSONL, JSON array, CSV, Parquet or a datasets save_to_disk folder, with prompt, completion "
        "(or chat messages: user, assistant)[, id, label].",
        check=existing_path,
    )
    queries: Path = setting(REQUIRED, "Query rows (same formats as training rows).", check=existing_path)
    task: str = setting(
        REQUIRED,
        "rules | math | backdoor | backdoor-multi | unwanted | backdoor-paraphrase | facts | unwanted-paraphrase, "
        "or path:<train file>:<test file> (labelled rows; append :identify to find the rows with the query's "
        "label); the test rows are the queries.",
    )
    n_train: int | None = setting(None, "Training rows (default: the task's).", check=at_least(1))
    n_test: int | None = setting(None, "Test rows, the queries (default: the task's).", check=at_least(1))
    n_queries: int | None = setting(None, "Only the first N queries (default: all; the demo: 10).", check=at_least(1))
    batch_size: int = setting(AttributionConfig.batch_size, "Rows per batch.", check=at_least(1))
    max_length: int = setting(
        AttributionConfig.max_length,
        "Longest prompt+completion in tokens, for fine-tuning and attribution alike; a longer row is an "
        "error, nothing is truncated (a command that takes --truncate cuts it instead).",
        check=at_least(1),
    )
    chat_template: bool = setting(False, "Wrap prompts in the tokenizer's chat template.")
    query_without_eos: bool = setting(
        False,
        "Leave the EOS appended to each query's completion out of f (default: f = log p(completion, EOS | prompt), "
        "'this answer, then stop').",
    )
    template: str | None = setting(
        None,
        "Render each row as this text, tokenized once with the tokenizer's BOS: {prompt} once, {completion} at "
        "the end (the reference study: '[INST] {prompt} [/INST] {completion}'). Default: prompt and completion as "
        "they are.",
        check=template_text,
    )
    no_eos: bool = setting(False, "Append no EOS to the completions (the reference study).")
    pad_left: bool = setting(
        False, "Left-pad every row to exactly --max-length tokens, attention 0 there (the reference study: yes, 128)."
    )
    truncate: bool = setting(
        False,
        "Cut a row longer than --max-length to its first max-length tokens instead of refusing it (the reference "
        "study: yes, at 128).",
    )
    loss_tokens: str = setting(
        AttributionConfig.loss_tokens,
        "Tokens that carry the loss: completion (and its EOS) | all (every next-token position, padding, prompt "
        "and template included: the reference study).",
        check=one_of(*LOSS_TOKENS),
    )


@dataclass
class TrackingSettings:
    """Tracking: which modules are attributed through."""

    include: list[str] | None = setting(None, "Regex of module names to track (repeatable).", check=regexes)
    exclude: list[str] | None = setting(None, "Regex of module names to skip (repeatable).", check=regexes)


@dataclass
class CurvatureSettings:
    """Curvature: the curvature G and its damping in (G + lambda I)^-1."""

    strategy: str = setting(
        AttributionConfig.strategy,
        "identity | diagonal | kfac | ekfac | exact | cg | lissa | arnoldi | datainf",
        check=strategy_name,
    )
    fisher: str = setting(
        AttributionConfig.fisher, "true (labels sampled from the model) | empirical", check=one_of(*FISHERS)
    )
    damping: float | None = setting(
        None,
        "Absolute damping lambda; default: --damping-factor x the mean eigenvalue per module (Grosse et al.; "
        "analyze ihvp: one lambda for every module, --damping-factor x the Hutchinson estimate of the mean GGN "
        "eigenvalue).",
        check=positive,
    )
    damping_factor: float = setting(
        DAMPING_FACTOR, "Relative damping, used when --damping is not given.", check=positive
    )
    reduction: str = setting(
        AttributionConfig.reduction, "Training loss over completion tokens: sum | mean.", check=one_of(*REDUCTIONS)
    )
    query_rank: int | None = setting(None, "Low-rank query batching rank (default: full rank).", check=at_least(1))
    strategy_option: list[str] | None = setting(
        None,
        "Strategy option key=value (JSON value; repeatable), e.g. max_iter=300, rank=64.",
        check=option_pairs,
    )
    exact_blocks: str = setting(
        EXACT_BLOCKS, "Exact reference: full (whole GGN) | module (block diagonal).", check=one_of(*BLOCKS)
    )


@dataclass
class MethodSettings:
    """Methods: which attribution methods run, with which options."""

    method: str | None = setting(
        None,
        "Method name (see `wherefrom.methods.registry.METHODS`): ekfac, kfac, lissa, cg, arnoldi, datainf, gradsim, "
        "gradsim-cosine, tracin, repsim, bm25, trak, logra, ... (required by attribute and tune; fit: default --strategy).",
        check=method_names,
    )
    methods: str | None = setting(
        None, "Comma-separated method names (default: the command's own set, in its description).", check=method_names
    )
    option: list[str] | None = setting(
        None,
        "Method option key=value or method.key=value (JSON value; repeatable), e.g. lissa.depth=300, repsim.layer=-1.",
        check=option_pairs,
    )
    prefilter: int | None = setting(
        None,
        "Score only each query's top-K BM25 candidates (Grosse et al.'s prefilter); others are NaN.",
        check=at_least(1),
    )


@dataclass
class SearchSettings:
    """Search: top-k over the run's vector store of training rows (built by `wherefrom index`)."""

    search: str | None = setting(
        None,
        "exact (streaming, memory of two blocks of rows, each whole shards) | faiss (approximate; prints its recall@k against exact): answer "
        "from the run's vector store.",
        check=one_of("exact", "faiss"),
    )
    search_option: list[str] | None = setting(
        None,
        "FAISS option key=value (repeatable): "
        + ", ".join(f"{o.name}={'|'.join(o.choices)}" if o.choices else o.name for o in FAISS_OPTIONS)
        + " (see `wherefrom.core.search.FAISS_OPTIONS`).",
        check=field_pairs,  # names and values: check_search, after --search
    )
    prefilter_bm25: int | None = setting(
        None,
        "Search only each query's top-N BM25 rows (Grosse et al.'s prefilter), exactly unless --search faiss.",
        check=at_least(1),
    )
    no_recall: bool = setting(
        False,
        "With --search faiss: skip the exact search that measures recall@k (a pass over the whole store) and the "
        "hashing of every shard before it; a saved FAISS index is then searched without reading the rows.",
    )


@dataclass
class ScoringSettings:
    """Scoring: what is shown of the scores."""

    prompt: str = setting(REQUIRED, "The query prompt.", argument=True)
    completion: str = setting(REQUIRED, "The completion whose log-likelihood is attributed.", argument=True)
    top_k: int = setting(
        TOP_K,
        "Rows shown per query and end: scores and attribute print the highest, query and --search both ends "
        "(the top-k CSV of scores and attribute keeps as many of each end).",
        check=at_least(1),
    )
    by_module: int = setting(
        3, "Show the modules with the largest share for each proponent (0 = none).", check=at_least(0)
    )
    per_token: bool = setting(False, "Split each top row's score over its tokens.")
    as_json: bool = setting(False, "Print machine-readable JSON to stdout.", flag="--json")


@dataclass
class FinetuneSettings:
    """Fine-tuning: fine-tuning (LoRA or full) before attribution, and the seeds."""

    epochs: int = setting(FinetuneConfig.epochs, "Fine-tuning epochs.", check=at_least(1))
    learning_rate: float = setting(
        FinetuneConfig.learning_rate,
        "AdamW fine-tuning learning rate, at the start of --lr-schedule (full fine-tuning of a real model: ~1e-5).",
        check=positive,
    )
    lora_rank: int = setting(FinetuneConfig.lora_rank, "LoRA rank; 0 fine-tunes every weight.", check=at_least(0))
    lora_alpha: int = setting(FinetuneConfig.lora_alpha, "LoRA alpha (scale alpha / rank).", check=at_least(1))
    lora_target: list[str] | None = setting(
        None, "Module name to adapt with LoRA (repeatable; default q_proj and v_proj)."
    )
    weight_decay: float = setting(FinetuneConfig.weight_decay, "AdamW weight decay.", check=at_least(0))
    lora_dropout: float = setting(
        FinetuneConfig.lora_dropout, "LoRA dropout while fine-tuning (the reference study: 0.1).", check=fraction
    )
    lr_schedule: str = setting(
        FinetuneConfig.lr_schedule,
        "Learning-rate schedule: constant | linear (decay to 0 over all steps, no warm-up: the reference study).",
        check=one_of(*LR_SCHEDULES),
    )
    full: bool = setting(False, "Fine-tune every weight (the same as --lora-rank 0).", flag="--full")
    seed: int = setting(
        AttributionConfig.seed,
        "Random seed of what the command draws: task data, LoRA initialisation, epoch orders, Fisher labels.",
        check=at_least(0),
    )
    seeds: str | None = setting(
        None,
        "Comma-separated seeds, none repeated (default: 0 for a new bench; 0,1,2 for ablate and word-order; every seed "
        "of the bench for analyze).",
        check=seed_list,
    )


@dataclass
class GroundTruthSettings:
    """Ground truth: retraining budget of a ground truth (LDS, leave-one-out, PBRF)."""

    alpha: float = setting(GroundTruthConfig.alpha, "LDS subset fraction.", check=open_fraction)
    subsets: int = setting(GroundTruthConfig.n_subsets, "LDS subsets (0: no LDS).", check=at_least(0))
    subset_seeds: int = setting(
        GroundTruthConfig.subset_seeds, "Training seeds per LDS subset (averaged).", check=at_least(1)
    )
    loo_rows: int = setting(GroundTruthConfig.loo_rows, "Rows left out one at a time (0: no LOO).", check=at_least(0))
    loo_seeds: int = setting(
        GroundTruthConfig.loo_seeds, "Training seeds per LOO set and for the full set (averaged).", check=at_least(1)
    )
    pbrf_rows: int = setting(
        GroundTruthConfig.pbrf_rows, "Rows for PBRF on the full-data model (0: none).", check=at_least(0)
    )
    pbrf_option: list[str] | None = setting(
        None, "PBRFConfig field key=value (JSON value; repeatable), e.g. steps=200.", check=field_pairs
    )
    workers: int = setting(
        GroundTruthConfig.workers,
        "Parallel retraining processes (each gets cores // workers threads).",
        check=at_least(1),
    )


@dataclass
class StudySettings:
    """Analyses and tuning: analyses and tuning on a bench or ground-truth folder."""

    kind: str = setting(
        REQUIRED,
        "ihvp (iHVP error vs metric) | convergence (metric per epoch) | weights (weight change vs behaviour change).",
        argument=True,
    )
    reference: str = setting(
        IhvpSettings.reference,
        "ihvp: exact | cg | auto (exact when the dense GGN fits, else cg).",
        check=one_of(*REFERENCES),
    )
    cg_tol: float = setting(IhvpSettings.cg_tol, "ihvp: relative residual of the cg reference.", check=positive)
    cg_max_iter: int = setting(
        IhvpSettings.cg_max_iter, "ihvp: iterations of the cg reference at most.", check=at_least(1)
    )
    probes: int = setting(
        IhvpSettings.probes, "ihvp: Hutchinson probes of the default damping's trace estimate.", check=at_least(1)
    )
    grid: list[str] = setting(
        REQUIRED,
        "key=v1,v2,... (repeatable; the grid is their product): damping_factor=0.001,0.01,0.1,1, damping=..., "
        "depth=100,500, rank=16,64.",
        check=grid_pairs,
    )
    n_facts: int = setting(WordOrderConfig.n_facts, "word-order: invented facts, one query each.", check=at_least(1))
    repeats: int = setting(
        WordOrderConfig.repeats, "word-order: training rows per fact and ordering.", check=at_least(1)
    )
    n_controls: int = setting(
        WordOrderConfig.n_controls, "word-order: rows stating unrelated invented facts.", check=at_least(1)
    )
    split_seed: int = setting(SPLIT_SEED, "Seed of the selection / held-out split of the queries.", check=at_least(0))
    selection_share: float = setting(
        SELECTION_SHARE, "Share of the queries the choice is made on; the rest are held out.", check=open_fraction
    )


@dataclass
class PresetSettings:
    """Presets: named bundles of settings (wherefrom's, the reference study's); see wherefrom.studies.presets."""

    preset: str | None = setting(
        None,
        "reference-study | wherefrom: start from this bundle of settings; a flag given overrides it, also at its "
        "default value, e.g. --fisher true (bench records the resolved settings).",
        check=preset_name,
    )
    start: str = setting("reference-study", "ablate: the preset to start from.", check=preset_name, flag="--from")
    target: str = setting(
        "wherefrom",
        "ablate: the preset whose settings are switched in, one switch at a time.",
        check=preset_name,
        flag="--to",
    )


@dataclass
class DeviceSettings:
    """Device: where the work runs."""

    device: str | None = setting(
        None,
        "cpu | cuda | cuda:N | mps (default: cuda when available; on an existing run or bench folder: its setting).",
        check=device_here,
        per_process=True,
    )
    threads: int | None = setting(
        None,
        "Torch CPU threads (default: the cores this process may use minus the 1-minute load average, at least 1).",
        check=at_least(1),
        per_process=True,
    )
    autocast: str | None = setting(
        None,
        "Run the model's forward passes in bfloat16 | float16 (torch.autocast; statistics stay float32/float64); "
        "default: the model's own dtype.",
        check=one_of("bfloat16", "float16"),
    )


@dataclass
class OutputSettings:
    """Output: where results go, and folders written by earlier commands."""

    run: Path = setting(REQUIRED, "Run directory (created by `fit`).", check=output_folder)
    out: Path | None = setting(
        None,
        "Output folder (its contents: see the command's description; optional for evaluate, tune, report and "
        "influence, which have a default; report: the HTML file, evaluate: the reports' file stem).",
        check=output_folder,
    )
    name: str = setting(
        "scores", "Score set under RUN/scores/ (`scores` writes it, `influence` reads it).", check=score_set_name
    )
    overwrite: bool = setting(False, "Replace earlier results of this command in its output folder (default: refuse).")
    shard_size: int = setting(
        SHARD_SIZE, "Rows per index shard (an interrupted index resumes at shard granularity).", check=at_least(1)
    )
    dtype: str = setting(DTYPE, f"Index storage dtype: {' | '.join(DTYPES)}.", check=one_of(*DTYPES))
    precondition: str = setting(
        PRECONDITION,
        "Index rows of a trak/logra run: fitted = the fitted projected (F~ + lambda I)^-1 applied to each row (the "
        "method's own scores); none = raw projected gradients (projected gradient similarity); adam = each "
        "per-example gradient divided elementwise by AdamW's sqrt(v_hat) + eps before projection (LESS/TrackStar; "
        "trak, tracin, and influence runs fitted with --strategy identity; queries stay plain gradients); empirical = "
        "raw projected gradients in one pass, then the projected Fisher of the stored rows fitted and applied to "
        "each query (a trak/logra run of the exact strategy without a true-Fisher curvature of its own: fit it with "
        "--option curvature=false, no pass, or --fisher empirical).",
        check=one_of(*PRECONDITIONS),
    )
    optimizer_checkpoint: Path | None = setting(
        None,
        "Fine-tuning checkpoint folder whose saved AdamW state --precondition adam divides by (default: the run's "
        "adapter or model folder when it is a `finetune` checkpoint, else the last epoch checkpoint of the "
        "fine-tuning run whose final weights it is; a tracin run uses each checkpoint's own).",
        check=existing_path,
    )
    unit_norm: bool = setting(
        False,
        "Divide each index row and each query vector by its norm (trak/logra/repsim/tracin runs: cosine-like scores).",
    )
    with_index: bool = setting(
        False,
        "After the fit, store the training rows in RUN/index/ as `wherefrom index` does (--shard-size, --dtype; "
        "no preconditioning options): a K-FAC/EK-FAC fit that keeps its per-example gradients (when they fit in "
        "memory) writes them from its own pass, so neither the index nor a later `scores` makes a training pass.",
    )
    bench: Path = setting(
        REQUIRED, "Bench folder written by `wherefrom bench` (bench.json, seed-<s>/finetune).", check=existing_path
    )
    groundtruth: Path = setting(
        REQUIRED, "Ground-truth folder (built by `wherefrom groundtruth`).", check=groundtruth_folder, argument=True
    )
    folder: Path = setting(
        REQUIRED, "An output folder holding a config.json written by wherefrom.", check=replay_folder, argument=True
    )
    cache: Path | None = setting(
        None, "Demo folder (default: $WHEREFROM_CACHE/demo or ~/.cache/wherefrom/demo).", check=output_folder
    )
    html: Path | None = setting(
        None, "Also write this query's view as one self-contained HTML file.", check=output_file
    )
    path: Path = setting(
        REQUIRED,
        "A run, bench, ablate, evaluate, diagnose, word-order or attribute folder, or a query JSON (`wherefrom query --json`).",
        check=existing_path,
        argument=True,
    )


GROUPS: tuple[type, ...] = (
    ModelSettings,
    DataSettings,
    TrackingSettings,
    CurvatureSettings,
    MethodSettings,
    SearchSettings,
    ScoringSettings,
    FinetuneSettings,
    GroundTruthSettings,
    StudySettings,
    PresetSettings,
    DeviceSettings,
    OutputSettings,
)


@dataclass(frozen=True)
class Setting:
    """One command-line setting: ``name`` (the parameter), ``flag``, ``type``, ``default`` (``...``:
    required), ``help``, ``check``, ``argument`` (positional), ``group`` (the panel title) and ``per_process``
    (each process of a ``torchrun`` group may set it for itself)."""

    name: str
    flag: str
    type: Any
    default: Any
    help: str
    check: Check | None
    argument: bool
    group: str
    per_process: bool = False

    @property
    def is_path(self) -> bool:
        """Whether the setting names a file or folder (its type is ``Path`` or ``Path | None``)."""
        return "Path" in str(self.type)

    def validate(self, value: Any, check: Check | None = None) -> str | None:
        """``None`` when ``value`` is valid (or ``None``), else a message naming the flag and the value. ``check``:
        the command's own check of this setting in place of the setting's (:func:`check_arguments`)."""
        check = check or self.check
        values = value if isinstance(value, list) else [value]
        huge = next((int64_problem(v) for v in values if int64_problem(v)), None)
        if huge is not None:  # stored, then a tensor or array of that size overflowed with a traceback
            return f"{self.given(value)}: {huge}"
        if value is None or check is None:
            return None
        problem = check(value)
        return None if problem is None else f"{self.given(value)}: {problem}"

    def given(self, value: Any) -> str:
        """The flag (or the argument's name) and ``value`` as the command line gives them (a list's items apart by
        spaces; a switch turned on by its flag alone), e.g. ``--damping 0.5``, ``--json``."""
        name = self.name.upper() if self.argument else self.flag
        if value is True:
            return name
        shown = value if not isinstance(value, list) else " ".join(map(str, value))
        return f"{name} {shown}"


def _settings() -> dict[str, Setting]:
    table: dict[str, Setting] = {}
    for group in GROUPS:
        hints = typing.get_type_hints(group)
        title = (group.__doc__ or group.__name__).split(":")[0]
        for item in fields(group):
            table[item.name] = Setting(
                name=item.name,
                flag=item.metadata["flag"] or "--" + item.name.replace("_", "-"),
                type=hints[item.name],
                default=item.default,
                help=item.metadata["help"],
                check=item.metadata["check"],
                argument=item.metadata["argument"],
                group=title,
                per_process=item.metadata["per_process"],
            )
    return table


SETTINGS: dict[str, Setting] = _settings()
"""Every setting by parameter name."""

ATTRIBUTION = (
    "damping",
    "damping_factor",
    "include",
    "exclude",
    "batch_size",
    "max_length",
    "chat_template",
    "template",
    "no_eos",
    "pad_left",
    "truncate",
    "loss_tokens",
    "query_without_eos",
)
"""The :class:`wherefrom.engine.api.AttributionConfig` settings of every command that runs a method on rows, the
input layout among them (a model fine-tuned with ``--no-eos`` or a template is attributed with the same flags;
``fit`` and ``attribute`` lacked them)."""

NEGATED_FLAGS = {"no_eos": "append_eos"}
"""``{flag: field}`` for the flags whose configuration field is their negation (``--no-eos`` sets
``append_eos=False``): the one table :func:`wherefrom.cli.app.settings_as`, :func:`wherefrom.cli.app.refuse_unread_settings`
and the studies' explicit settings read."""

FLAG_OF_FIELD = {field_name: flag for flag, field_name in NEGATED_FLAGS.items()}
""":data:`NEGATED_FLAGS` the other way round: ``{field: flag}``."""

REFERENCE_FINETUNING = tuple(FLAG_OF_FIELD.get(name, name) for name in LATER_FINETUNING)
"""The fine-tuning settings (input layout, LoRA, schedule) that the reference study set otherwise than wherefrom: the
command-line names of :data:`wherefrom.studies.finetuning.LATER_FINETUNING` (``append_eos`` is ``--no-eos``)."""

REFERENCE_SWITCHES = (*REFERENCE_FINETUNING, "fisher")
"""The settings of ``bench`` and ``ablate`` beyond :data:`wherefrom.studies.finetuning.FIRST_FINETUNING` that a preset sets
(:data:`wherefrom.studies.presets.PRESETS`)."""


def check_arguments(arguments: dict[str, Any], files: Mapping[str, Check] | None = None) -> list[str]:
    """Problems with ``{parameter: value}`` (the settings among them), one message each, in order. ``files``: the
    settings that name a file to write in this command though a folder elsewhere, with their check in place of the
    setting's (``report --out``: :func:`output_file`; ``evaluate --out``: :func:`output_stem`)."""
    problems = [
        SETTINGS[name].validate(value, (files or {}).get(name)) for name, value in arguments.items() if name in SETTINGS
    ]
    return [p for p in problems if p is not None] + contradictions(arguments)


def contradictions(arguments: Mapping[str, Any]) -> list[str]:
    """Flags of ``arguments`` that another one makes unused, each off its default (userS: ``--full --lora-rank 8``
    fine-tuned every weight and recorded rank 8 nowhere; ``--damping 1 --damping-factor 0.5`` recorded a factor that
    changed nothing)."""
    problems = []
    unused = unused_damping_factor(arguments.get("damping"), arguments.get("damping_factor", DAMPING_FACTOR))
    if unused is not None:
        problems.append(f"--damping with --damping-factor: {unused}")
    rank = arguments.get("lora_rank", FinetuneConfig.lora_rank)
    if arguments.get("full") and rank not in (FinetuneConfig.lora_rank, 0):
        problems.append(f"--full fine-tunes every weight, so --lora-rank {rank} would change nothing: give one of them")
    if arguments.get("no_eos") and arguments.get("query_without_eos"):
        problems.append("--no-eos appends no EOS, so --query-without-eos has none to leave out: give one of them")
    if arguments.get("template") is not None and arguments.get("chat_template"):  # reviewU: said in Python's words
        problems.append("--template and --chat-template are two layouts of one row: give one of them")
    if arguments.get("full") or rank == 0:  # userA: taken, recorded, and a rerun refused over a change of nothing
        full = "--full" if arguments.get("full") else "--lora-rank 0"
        lora = {
            "lora_target": None,
            "lora_alpha": FinetuneConfig.lora_alpha,
            "lora_dropout": FinetuneConfig.lora_dropout,
        }
        for name, default in lora.items():
            if arguments.get(name, default) not in (default, [], ()):
                flag = f"--{name.replace('_', '-')} {_shown(arguments[name])}"
                problems.append(f"{full} fine-tunes every weight with no LoRA adapter, so {flag} would change nothing")
    return problems


def _shown(value: Any) -> str:
    """A flag's value as typed: a repeated flag's values joined by commas."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
