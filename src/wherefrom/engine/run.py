"""A run directory: a fitted method, gradient index and scores for one (model, data, settings).

Layout::

    RUN/config.json            every argument (RunConfig), enough to redo the run in one line; the
                               training file, model and adapter as absolute paths, so the run opens
                               from any working directory
    RUN/manifest.json          versions, hardware, model/tokenizer/data fingerprints, module shapes
    RUN/.wherefrom.lock        writer lock: one fit / index / scores writer at a time
    RUN/factors/settings.json  the fit's settings, recorded before its first stage
    RUN/factors/stages/        finished fitting stages (deleted once the factors are saved)
    RUN/factors/               curvature.safetensors, then curvature.json (finished)
    RUN/method/                a method outside the influence family (trak, logra, tracin, repsim,
                               bm25): settings.json first, method.safetensors, then method.json
                               (finished; :mod:`wherefrom.methods.saved` says what each keeps)
    RUN/index/                 a :class:`wherefrom.core.vectors.VectorStore` (one row per training
                               row: raw gradients, or a trak/logra/repsim/tracin run's vectors):
                               settings.json first, ids.json, shard-NNNNN.safetensors,
                               index.json last (the index is complete)
    RUN/index-parts/           while a tracin run's index is built: one store per checkpoint
                               (checkpoint-C/, its column block), deleted once the index is complete
    RUN/scores/<name>.safetensors + <name>.json   pairwise scores with their ids
    RUN/*/checksums.json       checksum (xxh3_128) and size of every file above, recorded after it is written

Every file is written atomically and checksummed, following the resumable-job contract of
:mod:`wherefrom.core.store`: ``fit`` and ``index`` hold the run's writer lock, resume from whatever
finished intact (rebuilding a damaged or truncated file, named in :attr:`Run.notices`) and refuse
to resume under other settings (:class:`wherefrom.core.store.SettingsMismatch` names each one); readers
(``scores``, ``query``) verify every file before using it and refuse a damaged one
(:class:`wherefrom.core.store.DamagedFile`). Opening a run with another model, tokenizer, module
selection or training set raises :class:`RunMismatch` naming what differs; a training file, model or
adapter folder that is no longer where the run recorded it is refused by name (give the training
file's new place to :meth:`Run.open`: it is taken when its rows' fingerprint matches).
"""

from __future__ import annotations

import errno
import gc
import math
import shlex
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from wherefrom.core.data import Record, data_fingerprint, load_records
from wherefrom.core.distributed import (
    alone,
    barrier,
    gather_columns,
    held_by_main,
    is_main,
    on_every,
    on_main,
    rank,
    refuse,
    rows_for_rank,
    shards_for_rank,
    sum_counts,
    world_size,
)
from wherefrom.core.encoding import TokenBoundaryWarning
from wherefrom.core.gradients import block_products, flatten_blocks, split_rows
from wherefrom.core.memory import check_memory, nbytes
from wherefrom.core.options import with_defaults
from wherefrom.core.scoring import TOP_K, Scores, save_scores
from wherefrom.core.store import (
    SETTINGS,
    DamagedFile,
    SettingsMismatch,
    StageFolder,
    atomic_write_json,
    atomic_write_text,
    damage,
    forget_file,
    hardware,
    holder_guard,
    intact_json,
    package_versions,
    read_json_object,
    record_settings,
    recorded_differences,
    refuse_folder_in_place,
    settings_differences,
    unchecked_json,
    writer_lock,
    writing_now,
)
from wherefrom.core.tracking import selection_signature
from wherefrom.core.vectors import (
    DTYPE,
    DTYPES,
    LAYOUT,
    MARKER,
    REBUILD,
    SHARD_SIZE,
    VectorStore,
    VectorStoreWriter,
    stop_reason,
)
from wherefrom.curvature import STRATEGIES, Curvature, load_curvature
from wherefrom.curvature.base import META_FILE as CURVATURE_META
from wherefrom.curvature.base import TENSORS_FILE as CURVATURE_TENSORS
from wherefrom.curvature.base import Progress, no_progress
from wherefrom.engine.api import AttributionConfig, Attributor, checked_rows
from wherefrom.engine.passes import Kept, kept_rows
from wherefrom.methods.projection import ProjectedInfluence
from wherefrom.methods.registry import (
    GRADIENT_SETTINGS,
    ROW_FAMILIES,
    Method,
    in_family,
    make_method,
    method_settings,
    method_spec,
    options_in_full,
    refuse_skipped_options,
    similarity_family,
    split_settings,
)
from wherefrom.methods.saved import META_FILE, TENSORS_FILE, load_fitted, save_fitted
from wherefrom.methods.tracin import TracIn, finetune_checkpoints, interleave_checkpoints
from wherefrom.models.finetune import CONFIG_FILE as FINETUNE_CONFIG
from wherefrom.models.finetune import TRAINER_STATE_FILE, warn_layout_mismatch
from wherefrom.models.loading import LoadedModel, load_model, recorded_tokenizer_fingerprint
from wherefrom.models.optimizer_state import OPTIMIZER_STATE_FILE, AdamState, MissingOptimizerState

TRAIN_GRADIENT_SETTINGS = (GRADIENT_SETTINGS - {"query_without_eos", "normalize"}) | {"reduction"}
"""The attribution settings that change stored training gradients (recorded with an index, in its ``gradients``):
:data:`wherefrom.methods.registry.GRADIENT_SETTINGS` less the query measurement and the score normalisation, and
the training loss's ``reduction``."""
PRECONDITION = "fitted"
"""The default of what index rows are preconditioned with (``wherefrom index --precondition``)."""
PRECONDITIONS = (PRECONDITION, "none", "adam", "empirical")
"""What the index rows are preconditioned with (see :meth:`Run.build_index`)."""
PRECONDITIONER = "preconditioner"
"""The folder in ``RUN/index/`` of an ``empirical`` index's projected Fisher, fitted on its stored rows."""
UNFITTED_PRECONDITIONS = ("none", "empirical")
"""The index kinds of a trak/logra run that do not use the method's fitted curvature (built before any fit)."""
FINISHED_PARTS = ("factors/curvature.json", f"method/{META_FILE}", "index", "scores")
"""What a run folder holds once a result is finished (fitted factors or method, an index, scores): its settings are
fixed from then on (:meth:`Run.finished`)."""


RUN_RECORDS = {
    "config.json": "the run's settings",
    "manifest.json": "the model and data fingerprints they were made with",
}
"""The two files that make a folder a run, and what each records for its results (:func:`lost_record`)."""


def lost_record(folder: Path) -> str | None:
    """The refusal of a run ``folder`` that holds finished results (:data:`FINISHED_PARTS`) and one of
    :data:`RUN_RECORDS` but not the other, naming the lost file and what to do; ``None`` for any other folder
    (neither file: not a run). Every command had named it "not a wherefrom run directory; run `wherefrom fit`
    first", and ``fit`` there said the same (userM: a lost manifest.json; a lost config.json alike)."""
    found = sorted({part.split("/")[0] for part in FINISHED_PARTS if (folder / part).exists()})
    kept = [name for name in RUN_RECORDS if (folder / name).is_file()]
    if not found or len(kept) != 1:
        return None
    (lost,) = set(RUN_RECORDS) - set(kept)
    return (
        f"{folder} holds a run's results ({', '.join(f'{name}/' for name in found)}) and its {kept[0]} but not its "
        f"{lost}, which records {RUN_RECORDS[lost]}, so they cannot be checked, reused or resumed: restore {lost}, or "
        f"delete {folder} to fit the run again"
    )


UNRECORDED_INDEX_OPTIONS = {"precondition": PRECONDITION, "unit_norm": False}
"""What a store's missing ``precondition`` and ``unit_norm`` mean when its settings are compared: an influence run's
raw gradient store records them for ``adam`` rows only (:meth:`Run.index_settings`), so a rerun with the default
after ``adam`` named them "recorded 'adam', now absent" and ``unit_norm`` as changed (userL)."""
INDEX_OPTIONS = ("shard_size", "dtype", "precondition", "unit_norm", "device")
"""The index settings that ``wherefrom index`` options choose (``--shard-size``, ``--dtype``, ``--precondition``,
``--unit-norm``, ``--device``; and ``--optimizer-checkpoint`` the AdamW state's folder): a store started under other
ones is reused or resumed by the command of the recorded ones (:meth:`Run.index_command`). Every other recorded
setting (the model, its checkpoints and their AdamW states, the training rows, the method's settings) comes from the
run: a store that differs there must be rebuilt."""
ENCODE_CHECK_ROWS = 4096
"""Rows tokenized at a time when ``index`` checks every training row before its pass (a row over ``max_length`` or
the model's positions was found when its shard came: 5 of 7 shards written); their encodings are not kept. Measured:
the 4,700 shared training rows in 1.15 s with SmolLM2's tokenizer, against 6,674 s for their index build
(``benchmarks/results/index_real.md``)."""
WITH_PRECONDITION = ("attribution", "optimizer_state")
"""Index settings recorded under some ``--precondition`` kinds only (the fit's settings with fitted projected rows,
the AdamW states with ``adam``): they differ when the kind does."""
INDEX_PARTS = "index-parts"
"""The folder of a tracin index's per-checkpoint column blocks while it is built."""
RUN_FOLDERS = (
    "factors",
    "factors/stages",
    "method",
    "index",
    f"index/{PRECONDITIONER}",
    INDEX_PARTS,
    "scores",
)
"""The folders a run's commands write in (the module docstring's layout)."""
FIT_ALONE = "fit it in one process; the influence methods (a curvature strategy) fit in many"
"""What to do instead when a method outside the influence family is fitted under ``torch.distributed``."""


def refuse_files_in_place(folder: Path) -> None:
    """Raise ``NotADirectoryError`` naming the first of the run's folders (:data:`RUN_FOLDERS`) that is a file, before
    the model loads: a command would fail in it later, with an error naming a file under it (``fit`` after the
    checks, ``scores`` after the query pass), or take it for a folder not yet made (no fitted curvature). The file
    is not the run's: it is neither deleted nor replaced."""
    for name in RUN_FOLDERS:
        path = Path(folder) / name
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file is where the run's folder belongs; move it away", str(path))


def refuse_stateless_checkpoint(given: Path) -> None:
    """Raise :class:`wherefrom.models.optimizer_state.MissingOptimizerState` when ``--optimizer-checkpoint``
    ``given`` holds no AdamW state but is a file, or lies beside checkpoints that hold one (a file in a checkpoint
    folder, a fine-tuning's output folder or its final weights), naming those: the advice of a checkpoint saved
    before states were kept (fine-tune again) would be wrong there. Else the state's reader names the folder."""
    if (given / OPTIMIZER_STATE_FILE).is_file():
        return
    found = [given.parent] if given.is_file() else []
    for output in (given, given.parent):  # a fine-tuning's output folder, or its adapter/model folder given
        if (output / FINETUNE_CONFIG).is_file():
            with suppress(FileNotFoundError):
                found += finetune_checkpoints(output)
    found = [str(folder) for folder in dict.fromkeys(found) if (folder / OPTIMIZER_STATE_FILE).is_file()]
    what = "is a file" if given.is_file() else f"holds no AdamW state ({OPTIMIZER_STATE_FILE})"
    if found:
        raise MissingOptimizerState(
            f"--optimizer-checkpoint {given} {what}: it takes a checkpoint folder holding {OPTIMIZER_STATE_FILE}; "
            f"these hold one: {', '.join(found)} (without the flag, a run on a fine-tuning's final weights takes its "
            "last checkpoint)"
        )
    if given.is_file():
        raise MissingOptimizerState(
            f"--optimizer-checkpoint {given} is a file: it takes a checkpoint folder that `wherefrom finetune` saved "
            f"(OUT/checkpoints/epoch-K, holding {OPTIMIZER_STATE_FILE})"
        )


def sentence(clause: str) -> str:
    """``clause`` with its first letter in upper case (the rest as it is), to begin a sentence."""
    return clause[:1].upper() + clause[1:]


def refuse_distributed_scores(config: RunConfig) -> None:
    """:class:`wherefrom.core.distributed.NotDistributable` under ``torch.distributed`` for a run of a method outside
    the influence family (``config.method``): its scores come from its fitted state or its index in one process."""
    if config.method is not None:
        refuse(f"scoring method {config.method!r}", "score it in one process; influence methods score in many")


RECORDED_ONLY = ("threads",)
"""Settings recorded with a fit or an index but never compared: torch's CPU thread count changes float sums in
the last bits (e.g. EK-FAC factors of SmolLM2), so a resumed job takes the recorded value
(:meth:`Run.threads_as_recorded`) and a finished result is reused with any."""
RESUMED_WHERE_STARTED = ("device", "processes")
"""Settings of a fit that a resumed fit must keep (its finished stages were summed there: a fit killed under two
processes and resumed in one matched neither clean fit) and that finished factors are reused under any of."""


class RunMismatch(ValueError):
    """The run directory was made with another model, tokenizer, selection or data."""


def train_gradient_settings(attribution: AttributionConfig) -> dict[str, Any]:
    """``attribution``'s :data:`TRAIN_GRADIENT_SETTINGS` (JSON form): what an index's rows depend on beyond the
    model, its module selection and the projection."""
    return {k: v for k, v in attribution.to_dict().items() if k in TRAIN_GRADIENT_SETTINGS}


def absolute(path: str | None) -> str | None:
    """``path`` resolved to an absolute path when it exists here; otherwise as given (``None`` stays)."""
    if path is None or not Path(path).exists():
        return path
    return str(Path(path).resolve())


@dataclass
class RunConfig:
    """Arguments of ``wherefrom fit``: model, data, the method and the attribution settings.

    ``model`` ``None`` = the default SmolLM2-135M-Instruct; ``device`` ``None`` = CUDA if available.
    ``method`` ``None`` = the curvature strategy ``attribution.strategy`` (fitted into ``factors/``, as is
    every influence method); a method of another family (``trak``, ``logra``, ``tracin``, ``repsim``,
    ``bm25``) is made with ``options`` (its constructor options) and fitted into ``method/``.
    """

    train: str
    model: str | None = None
    adapter: str | None = None
    device: str | None = None
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    method: str | None = None
    options: dict = field(default_factory=dict)

    @classmethod
    def for_method(
        cls, method: str, train: str, attribution: AttributionConfig, options: dict[str, Any], **paths: Any
    ) -> RunConfig:
        """The config of ``method`` with ``options`` (validated first: :func:`wherefrom.methods.registry.method_settings`
        raises naming a bad option). Setting options go into ``attribution``; an influence method's
        strategy options into ``attribution.strategy_options``; another method's options stay in ``options``.
        ``paths``: ``model``, ``adapter``, ``device``."""
        merged, _checked = method_settings(method, attribution, options)
        constructor = split_settings(options)[1]
        if in_family(method, "influence"):
            merged = replace(merged, strategy_options={**merged.strategy_options, **constructor})
            constructor = {}
        return cls(train=train, attribution=merged, method=method, options=constructor, **paths)

    def settings(self) -> dict[str, Any]:
        """:meth:`to_dict` with every option of the strategy (``attribution.strategy_options``) and, for a run that
        fits a method, of the method (``options``) at its default where it was not given: the form in which a run
        folder's settings are recorded and compared, so that an option given at its default is the same setting
        as one left out (``config.json`` keeps the options as given, for replay)."""
        data = self.to_dict()
        strategy = STRATEGIES.get(self.attribution.strategy)
        if strategy is not None:
            data["attribution"]["strategy_options"] = with_defaults(
                strategy.option_specs, self.attribution.strategy_options
            )
        if self.fits_method:
            data["options"] = options_in_full(self.method, self.options)
        return data

    def setting_defaults(self) -> dict[str, Any]:
        """What a setting missing from a recorded ``settings.json`` is taken to be (the ``defaults`` of
        :func:`wherefrom.core.store.record_settings`): every attribution setting at its default (settings added
        since a folder was started do what the older version did; so folders fitted by an older version are still
        reused or resumed), every option of this run's strategy and method at its own, and an index's ``gradients``
        (:func:`train_gradient_settings`) at their defaults."""
        blank = RunConfig(
            self.train, attribution=AttributionConfig(strategy=self.attribution.strategy), method=self.method
        )
        defaults = {k: v for k, v in blank.settings().items() if k in ("attribution", "options")}
        return {**defaults, "gradients": train_gradient_settings(blank.attribution)}

    def resolved(self) -> RunConfig:
        """This config with ``train``, ``model`` and ``adapter`` as absolute paths (see :func:`absolute`)."""
        return replace(self, train=absolute(self.train), model=absolute(self.model), adapter=absolute(self.adapter))

    @property
    def fits_method(self) -> bool:
        """Whether the run fits a method into ``method/`` (not a curvature into ``factors/``)."""
        return self.method is not None and not in_family(self.method, "influence")

    @property
    def indexable(self) -> bool:
        """Whether :meth:`Run.build_index` can store this run's training side as a row per example: an influence
        run's raw gradients, a ``trak``/``logra``/``repsim`` run's vectors, a ``tracin`` run's checkpoint rows
        (:data:`wherefrom.methods.registry.ROW_FAMILIES`; a ``bm25`` run scores from its fitted state only)."""
        return self.method is None or any(in_family(self.method, family) for family in ROW_FAMILIES)

    def check_paths(self, folder: Path) -> None:
        """Raise :class:`RunMismatch` naming the training file, model or adapter folder recorded in
        ``folder/config.json`` that is not there any more."""
        for what, path in (
            ("training file", self.train),
            ("model folder", self.model),
            ("adapter folder", self.adapter),
        ):
            if path is not None and Path(path).is_absolute() and not Path(path).exists():
                raise RunMismatch(
                    f"the {what} {path} recorded in {Path(folder) / 'config.json'} is gone (moved or deleted); "
                    "put it back, or fit a new run"
                    + (" (or pass the file's new place: Run.open(..., train=PATH))" if what == "training file" else "")
                )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(AttributionConfig)}
        attribution = AttributionConfig(**{k: v for k, v in data.get("attribution", {}).items() if k in known})
        return cls(
            train=data["train"],
            model=data.get("model"),
            adapter=data.get("adapter"),
            device=data.get("device"),
            attribution=attribution,
            method=data.get("method"),
            options=data.get("options", {}),
        )


class Run:
    """An open run directory with its model loaded and checked against the manifest."""

    def __init__(
        self,
        folder: Path,
        config: RunConfig,
        loaded: LoadedModel,
        train: list[Record],
        progress: Progress = no_progress,
    ):
        self.folder = Path(folder)
        self.config = config
        self.loaded = self.in_recorded_form(loaded)
        self.train = checked_rows(train, f"training rows ({config.train})")
        self.attributor = Attributor(loaded.model, loaded.tokenizer, config.attribution, progress=progress)
        self.method: Method | None = None
        """The run's method outside the influence family (``None``: the attributor's curvature)."""
        if config.fits_method:
            self.method = make_method(
                config.method, loaded.model, loaded.tokenizer, config.attribution, progress, **config.options
            )
        self.method_fitted = False
        self.created_manifest: dict[str, Any] | None = None
        """The manifest :meth:`create` recorded (``None`` for a run :meth:`open` found): :meth:`fit` records the
        run's settings again under its lock, since another process may have recorded its own in between."""
        self.replaced: dict[Path, str | None] | None = None
        """The texts of ``config.json`` and ``manifest.json`` (``None``: absent) that :meth:`settle` replaced with this
        run's, put back when a fit is refused for the settings its unfinished state was started with
        (:meth:`put_back_replaced`)."""
        self.notices: list[str] = []
        """What a writer found and repaired (damaged files rebuilt, partial state of unknown settings discarded)."""

    def in_recorded_form(self, loaded: LoadedModel) -> LoadedModel:
        """``loaded`` with its tokenizer fingerprint in the form the folder's ``manifest.json`` recorded it
        (:func:`wherefrom.models.loading.recorded_tokenizer_fingerprint`): a run made before version 2 of the
        fingerprint keeps its records, and the settings of its factors and store, in version 1."""
        try:
            recorded = read_json_object(self.folder / "manifest.json").get("tokenizer_fingerprint")
        except (OSError, ValueError):  # no manifest yet, or a damaged one (checked where it is read)
            return loaded
        where = str(self.folder / "manifest.json")
        form = recorded_tokenizer_fingerprint(recorded, loaded.tokenizer, loaded.tokenizer_fingerprint, where)
        return loaded if form == loaded.tokenizer_fingerprint else replace(loaded, tokenizer_fingerprint=form)

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: Path, config: RunConfig, progress: Progress = no_progress) -> Run:
        """Open ``folder`` for ``config``: check it against a finished result there (fitted factors, an
        index or scores), else write config/manifest (a folder with nothing finished, e.g. after a fit that
        failed, takes the new settings).

        Raises :class:`RunMismatch` naming each setting that differs from a finished run's config (with
        both values), :class:`wherefrom.core.store.FolderLocked` while another process writes the run, and
        ``ValueError`` when ``config.options`` holds setting options (:func:`RunConfig.for_method` puts them in
        ``attribution``) or a method's option is bad or unread with its other options
        (:func:`wherefrom.methods.registry.refuse_skipped_options`), ``NotADirectoryError`` naming a file where one of the run's
        folders belongs (:func:`refuse_files_in_place`).
        Under ``torch.distributed`` rank 0 checks and writes the folder; a method outside the influence
        family, or a strategy that does not distribute (``cg``, ``lissa``, ``arnoldi``) where no fitted factors
        are there to reuse, raises :class:`wherefrom.core.distributed.NotDistributable` before the model loads
        (nothing is written); where the factors there are damaged, or their settings unknown (no intact
        ``settings.json``), :meth:`fit` raises it after the model loads, before it sets anything aside. Factors of
        other settings raise :class:`RunMismatch` here, as in one process.
        """
        folder = Path(folder)
        refuse_files_in_place(folder)
        config = config.resolved()
        read = method_spec(config.method).settings_read if config.method is not None else None
        warn_layout_mismatch(config.adapter or config.model, config.attribution.layout(), read)
        if config.method is not None:  # options checked before the model loads
            method_settings(config.method, config.attribution, config.options)
            refuse_skipped_options(config.method, asdict(config.attribution), config.options)
        else:  # a strategy and its options, likewise (fit --strategy exact --reduction mean left a folder behind)
            config.attribution.new_curvature().check_reduction(config.attribution.reduction)
        misplaced = split_settings(config.options)[0]
        if misplaced:  # the method would apply them, the recorded settings (RunConfig.settings) would not hold them
            raise ValueError(
                f"RunConfig.options holds setting options {sorted(misplaced)}: they are attribution settings "
                "(RunConfig.for_method puts a method's setting options there)"
            )
        if config.fits_method:
            refuse(f"method {config.method!r}", FIT_ALONE)
        elif config.attribution.strategy in STRATEGIES and not (folder / "factors" / CURVATURE_META).exists():
            STRATEGIES[config.attribution.strategy].refuse_distributed()  # nothing fitted to reuse
        loaded = load_model(config.model, config.adapter, device=config.device)
        run = cls(folder, config, loaded, load_records(config.train), progress)
        run.created_manifest = run.manifest()
        on_main(run.settle)
        return run

    def settle(self) -> None:
        """Check the folder against the run's config, or record the config and :meth:`create`'s manifest there
        (rank 0's job under ``torch.distributed``); under the run's writer lock (reentrant: a caller that holds it
        keeps it). :meth:`create` calls it, and :meth:`fit` again under its own hold of the lock: two processes
        that created the same new folder each recorded their config, and the one that fits must find its own.

        A folder with a finished result (:meth:`finished`) raises :class:`RunMismatch` naming each setting that
        differs (both values) or a manifest fingerprint that does; otherwise the run's config replaces what is
        recorded, and ``config.json`` is left as it is where it already records the same config (a record
        another writer added beside it, the CLI's ``replay``, stays)."""
        folder, config = self.folder, self.config
        with writer_lock(folder):
            if self.finished():
                # Round-trip through RunConfig: settings added in later versions take their defaults.
                saved = self.recorded_config(folder).resolved().settings()
                differences = settings_differences(saved, config.settings())
                if differences:
                    raise RunMismatch(
                        f"{folder} holds a run with other settings ({'; '.join(differences)}); "
                        "use a new --run folder or the same arguments"
                    )
                self._check(folder, self.created_manifest)
                return
            # nothing finished here yet: the new settings replace the old (what else the file holds, the CLI's
            # replay records, stays), put back where the unfinished state refuses them
            recorded, own = folder / "config.json", config.to_dict()
            try:
                saved = read_json_object(recorded)
            except (OSError, ValueError):  # missing or damaged: written anew
                saved = {}
            manifest = folder / "manifest.json"
            if self.replaced is None:
                self.replaced = {
                    path: path.read_text("utf-8") if path.is_file() else None for path in (recorded, manifest)
                }
            if any(saved.get(key) != value for key, value in own.items()):
                atomic_write_json({**saved, **own}, recorded)
            atomic_write_json(self.created_manifest, manifest)

    def put_back_replaced(self) -> None:
        """Write back the ``config.json`` and ``manifest.json`` that :meth:`settle` replaced (remove those it made):
        a fit refused for the settings its unfinished ``factors/`` or ``method/`` was started with leaves the run
        recorded as it was, so the recorded settings still resume it. Rank 0's job under ``torch.distributed``."""
        for path, text in (self.replaced or {}).items():
            if text is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_text(text, path)

    def finished(self) -> bool:
        """Whether the folder holds a finished result (fitted factors, an index or scores): only then are
        its settings fixed."""
        return any((self.folder / part).exists() for part in FINISHED_PARTS)

    @staticmethod
    def recorded_config(folder: Path) -> RunConfig:
        """The :class:`RunConfig` recorded in run ``folder`` (no model loaded); ``FileNotFoundError`` when
        ``folder`` is not a run directory: it lacks ``config.json`` or ``manifest.json`` (another command's output
        folder, such as ``attribute``'s, holds a ``config.json`` alone: it was read as a run's and the command
        failed on a bare ``manifest.json: No such file or directory`` after the model loaded)."""
        folder = Path(folder)
        missing = [name for name in ("config.json", "manifest.json") if not (folder / name).exists()]
        if missing:
            writer = writing_now(folder) if folder.is_dir() else None
            lost = lost_record(folder)
            if lost is not None and writer is None:
                raise FileNotFoundError(lost)
            advice = "run `wherefrom fit` first" if writer is None else f"it is being made now by {writer}: wait"
            raise FileNotFoundError(f"{folder} is not a wherefrom run directory (no {' or '.join(missing)}); {advice}")
        path = folder / "config.json"
        try:
            return RunConfig.from_dict(read_json_object(path))
        except (AttributeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} does not record a run's config ({error!r}); repair or delete it") from None

    @classmethod
    def open(
        cls,
        folder: Path,
        progress: Progress = no_progress,
        device: str | None = None,
        factors: bool = True,
        train: Path | str | None = None,
    ) -> Run:
        """Open an existing run from any working directory: reload model and data from its config and
        verify the fingerprints.

        With ``factors`` (the default) a fitted curvature or method is loaded, verified against its checksums
        (:class:`wherefrom.core.store.DamagedFile` names a damaged file); ``index`` does not need it.
        ``train``: the training file's new place when it was moved; taken only when its rows have the
        recorded fingerprint. Raises :class:`RunMismatch` naming a recorded file or folder that is gone, and
        ``NotADirectoryError`` naming a file where one of the run's folders belongs (:func:`refuse_files_in_place`).
        """
        folder = Path(folder)
        refuse_files_in_place(folder)
        config = cls.recorded_config(folder)
        if train is not None:
            config.train = absolute(str(train))
        if device is not None:
            config.device = device
        config.check_paths(folder)
        loaded = load_model(config.model, config.adapter, device=config.device)
        run = cls(folder, config, loaded, load_records(config.train), progress)
        manifest = run.manifest()
        run._check(folder, manifest)
        if not factors:
            return run
        try:
            if run.method is not None and (folder / "method" / META_FILE).exists():
                run.require_fitted(folder / "method", manifest)
                load_fitted(run.method, folder / "method", run.train)
                run.method_fitted = True
            elif run.method is None and (folder / "factors" / "curvature.json").exists():
                run.require_fitted(folder / "factors", manifest)
                run.attributor.use_curvature(load_curvature(folder / "factors"), run.train)
        except DamagedFile as error:
            raise DamagedFile(f"{error}; rerun `wherefrom fit` with this run's arguments to refit it") from None
        return run

    def require_fitted(self, target: Path, manifest: dict[str, Any]) -> None:
        """Refuse finished factors or a fitted method in ``target`` (``RUN/factors``, ``RUN/method``) whose recorded
        ``settings.json`` is not this run's (:meth:`fit_settings`; the device, process and thread count it was
        fitted with aside, as a finished fit is reused under any): :class:`wherefrom.core.store.SettingsMismatch`
        naming each setting that differs, :class:`wherefrom.core.store.DamagedFile` when ``settings.json`` is
        missing or damaged (the settings are unknown). Readers used whatever ``target`` held: K-FAC scores from a
        run's EK-FAC factors put in its place, scores of another damping or of other training rows, with no error,
        where ``fit`` refused them."""
        recorded = self.recorded_settings(target)
        if recorded is None:
            raise DamagedFile(f"{target / SETTINGS} is missing or damaged: the settings of its fit are unknown")
        differences = recorded_differences(
            recorded,
            self.fit_settings(manifest),
            (*RESUMED_WHERE_STARTED, *RECORDED_ONLY),
            self.config.setting_defaults(),
        )
        if differences:
            raise SettingsMismatch(
                f"{target} was fitted with other settings than run {self.folder} records "
                f"({'; '.join(text for _name, text in differences)}); delete {target} and rerun `wherefrom fit` with "
                "this run's arguments to refit it"
            )

    def manifest(self) -> dict[str, Any]:
        return {
            "versions": package_versions(),
            "hardware": hardware(),
            "model": {
                "name": self.loaded.name,
                "path": self.loaded.path,
                "adapter": self.loaded.adapter,
                "fingerprint": self.loaded.fingerprint,
            },
            "tokenizer_fingerprint": self.loaded.tokenizer_fingerprint,
            "data": {"path": self.config.train, "rows": len(self.train), "fingerprint": data_fingerprint(self.train)},
            "modules": selection_signature(self.attributor.modules),
            "dtype": str(next(self.loaded.model.parameters()).dtype),
        }

    @staticmethod
    def _check(folder: Path, now: dict[str, Any]) -> None:
        """:class:`RunMismatch` naming what differs between ``folder/manifest.json`` and the manifest ``now``
        (``ValueError`` naming a manifest that cannot be read)."""

        def model_named(manifest: dict[str, Any]) -> str:
            """``(in MODEL)``, or ``(in MODEL or ADAPTER)``: where the weights that changed are."""
            model = manifest["model"]
            return f"(in {model['path']}{'' if model['adapter'] is None else ' or ' + model['adapter']})"

        path = folder / "manifest.json"
        saved = read_json_object(path)
        try:
            checks = [
                (saved["model"]["fingerprint"], now["model"]["fingerprint"], f"model weights {model_named(now)}"),
                (
                    saved["tokenizer_fingerprint"],
                    now["tokenizer_fingerprint"],
                    "tokenizer (its vocabulary, special tokens, chat template, or how it encodes text: another "
                    "tokenizer file or class, or a transformers/tokenizers version that encodes otherwise)",
                ),
                (saved["modules"], now["modules"], "module selection"),
                (saved["data"]["fingerprint"], now["data"]["fingerprint"], f"training data ({now['data']['path']})"),
            ]
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path} does not hold a run's manifest ({error!r}); repair or delete it") from None
        for before, after, what in checks:
            if before != after:
                raise RunMismatch(f"{what} changed since this run was made; refit in a new run folder")

    # --- fit -----------------------------------------------------------------------------------
    def fit_settings(self, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """What decides the fitted factors' bytes: recorded in ``factors/settings.json`` first. ``manifest``: the
        run's :meth:`manifest`, when already made (it fingerprints the training rows)."""
        manifest = manifest or self.manifest()
        settings = self.config.settings()
        method = {"method": self.config.method, "options": settings["options"]} if self.config.fits_method else {}
        return {
            **method,
            "attribution": settings["attribution"],
            "model": manifest["model"]["fingerprint"],
            "tokenizer": manifest["tokenizer_fingerprint"],
            "data": manifest["data"]["fingerprint"],
            "modules": manifest["modules"],
            "device": self.attributor.device.type,
            "processes": world_size(),
            "threads": torch.get_num_threads(),
        }

    def fit(self, keep_gradients: bool = False) -> bool:
        """Fit the curvature unless intact finished factors exist; returns True when it fitted.

        ``keep_gradients``: keep the per-example training gradients of the fit's shared pass (K-FAC/EK-FAC
        when they fit in memory, :mod:`wherefrom.engine.passes`), so that :meth:`build_index` or
        :meth:`scores` in this process makes no training pass of its own. Off by default: a CLI ``fit``
        alone ends after it.

        Holds the run's writer lock. Finished fitting stages under ``factors/stages/`` are reused,
        so a killed fit resumes and gives the same factors; damaged factors are refitted (noted in
        :attr:`notices`). Raises :class:`wherefrom.core.store.SettingsMismatch` if ``factors/`` was
        started with other settings. A run of a method outside the influence family fits it instead
        (:meth:`fit_method`).

        Under ``torch.distributed`` rank 0 holds the lock, checks the folder and writes the stages and
        factors; every rank fits on its share of the rows (:meth:`wherefrom.engine.api.Attributor.fit`)
        and ends with the same curvature.
        """
        if self.method is not None:
            return self.fit_method()
        target = self.folder / "factors"
        stages = StageFolder(target / "stages")
        with held_by_main(lambda: writer_lock(self.folder)):
            if self.created_manifest is not None:
                on_main(self.settle)
            try:
                intact = on_main(lambda: self.factors_intact(target, stages))
            except SettingsMismatch:
                on_main(self.put_back_replaced)
                raise
            if intact:
                self.attributor.use_curvature(load_curvature(target), self.train)
                on_main(stages.clear)  # left by a fit killed after its final save
                return False
            started = time.perf_counter()
            with self.threads_as_recorded(target):  # a resumed fit's stages sum as its first ones did
                curvature = self.attributor.fit(self.train, stages=stages, keep_gradients=keep_gradients)
            curvature.info["fit_seconds"] = round(time.perf_counter() - started, 3)

            def save() -> None:
                curvature.save(target)
                stages.clear()

            on_main(save)
        return True

    @contextmanager
    def threads_as_recorded(self, folder: Path, note: bool = True) -> Iterator[None]:
        """Torch's CPU threads set for the block to the count ``folder/settings.json`` recorded when the job
        started (:data:`RECORDED_ONLY`; nothing changes when none is recorded), then set back: a job resumed after
        a kill, by default with the cores the load then left (``--threads``), gives the bytes of an uninterrupted
        one. With ``note`` a change is noted in :attr:`notices`."""
        recorded = (self.recorded_settings(folder) or {}).get("threads")
        now = torch.get_num_threads()
        if not isinstance(recorded, int) or recorded < 1 or recorded == now:
            yield
            return
        if note and is_main():
            self.notices.append(
                f"resumed {folder} with {recorded} torch threads, the count it started with (not {now}), so that it "
                "equals an uninterrupted run bit for bit"
            )
        torch.set_num_threads(recorded)
        try:
            yield
        finally:
            torch.set_num_threads(now)

    def factors_intact(self, target: Path, stages: StageFolder) -> bool:
        """Whether ``target`` holds intact factors fitted with this run's settings; when not, prepare it for a
        fit (settings recorded, unfinished marker removed; repairs noted in :attr:`notices`). Rank 0's job
        under ``torch.distributed``, holding the writer lock. Raises ``IsADirectoryError`` naming a folder in the
        place of a factors file, before the fit (which would fail writing it)."""
        files = [target / "curvature.safetensors", target / "curvature.json"]
        refuse_folder_in_place(*files)

        def problems() -> list[str]:
            return [p for p in map(damage, files) if p]

        found = problems()
        if (found or damage(target / SETTINGS)) and self.config.attribution.strategy in STRATEGIES:
            # a fit is to be made, or factors of unknown settings set aside: refused before that under torchrun
            # when the strategy cannot fit there (Run.create refuses earlier where there are no factors at all)
            STRATEGIES[self.config.attribution.strategy].refuse_distributed()
        started_before = stages.folder.is_dir() or any(
            (target / name).exists() for name in ("curvature.json", "curvature.safetensors")
        )
        if not started_before:
            # Nothing of a fit is finished here (an earlier fit was refused, or killed before its first stage): its
            # settings bind nothing, and the folder starts empty (no "settings unknown" note for what is expected)
            shutil.rmtree(target, ignore_errors=True)
            self.attributor.encode(self.train)  # rows the model cannot take: a DataError before anything is written
        # Finished factors are reused on any device; a resumed fit must run where it started.
        notes = record_settings(
            target,
            self.fit_settings(),
            self.refit_hint(target),
            ignore=RECORDED_ONLY if found else (*RESUMED_WHERE_STARTED, *RECORDED_ONLY),
            defaults=self.config.setting_defaults(),
        )
        if notes:  # factors of unknown settings were discarded
            self.notices += notes
            found = problems()
        if not found:
            return True
        if (target / "curvature.json").exists() or (target / "curvature.safetensors").exists():
            self.notices.append(f"refitting: {found[0]}")
        forget_file(target / "curvature.json")  # the factors are unfinished until both are rewritten
        return False

    def refit_hint(self, target: Path) -> Callable[[list[str]], str]:
        """What a fit refused for its settings (:func:`wherefrom.core.store.record_settings`) says to do: where only
        the process count or the device differs from the unfinished fit's in ``target`` (it resumes only where it
        started, :data:`RESUMED_WHERE_STARTED`), how to resume it there (``torchrun --standalone --nproc-per-node 2 -m
        wherefrom.cli -- replay RUN``; ``--device cuda``); in any case, or to delete ``target`` and fit again."""
        delete = f"delete {target} to fit again with the current settings"
        only_delete = f"{sentence(delete)}."

        def hint(differing: list[str]) -> str:
            if not differing or not set(differing) <= set(RESUMED_WHERE_STARTED):
                return only_delete
            recorded = intact_json(target / SETTINGS)
            recorded = recorded if isinstance(recorded, dict) else {}
            processes, device = recorded.get("processes"), recorded.get("device")
            ways = []
            if "processes" in differing and type(processes) is int and processes >= 1:
                launch = (
                    f"torchrun --standalone --nproc-per-node {processes} -m wherefrom.cli --"
                    if processes > 1
                    else "wherefrom"
                )
                ways.append(f"`{launch} {shlex.join(['replay', str(self.folder)])}`")
            if "device" in differing and isinstance(device, str):
                ways.append(f"its `fit` command with `--device {shlex.quote(device)}`")
            if len(ways) < len(differing):  # a value not recorded (a fit of an older version): no command to name
                return only_delete
            return f"The unfinished fit resumes only as it started: resume it with {' and '.join(ways)}, or {delete}."

        return hint

    def fit_method(self) -> bool:
        """Fit the run's method into ``method/`` unless an intact fitted state is there; returns True when it fitted.

        Holds the run's writer lock; records the fit's settings first (:class:`wherefrom.core.store.SettingsMismatch`
        names each one that differs); a damaged state is refitted (noted in :attr:`notices`).
        """
        refuse(f"method {self.config.method!r}", FIT_ALONE)
        target = self.folder / "method"
        with writer_lock(self.folder):
            if self.created_manifest is not None:
                self.settle()

            files = [target / TENSORS_FILE, target / META_FILE]
            refuse_folder_in_place(*files)  # a folder there: refused before the fit (which would fail writing it)

            def problems() -> list[str]:
                return [p for p in map(damage, files) if p]

            found = problems()
            try:
                notes = record_settings(
                    target,
                    self.fit_settings(),
                    self.refit_hint(target),
                    (*RESUMED_WHERE_STARTED, *RECORDED_ONLY),
                    self.config.setting_defaults(),
                )
            except SettingsMismatch:
                self.put_back_replaced()
                raise
            if notes:  # a state of unknown settings was discarded
                self.notices += notes
                found = problems()
            if not found:
                load_fitted(self.method, target, self.train)
                self.method_fitted = True
                return False
            if (target / META_FILE).exists() or (target / TENSORS_FILE).exists():
                self.notices.append(f"refitting: {found[0]}")
            forget_file(target / META_FILE)  # unfinished until both are rewritten
            self.method.fit(self.train)
            save_fitted(self.method, target)
            self.method_fitted = True
        return True

    # --- index ---------------------------------------------------------------------------------
    def vectors(self) -> Any:
        """The run's method when its train side is a vector per row (``trak``, ``logra``, ``repsim``: it has
        ``train_vectors``), else ``None`` (an influence run indexes raw gradients)."""
        return self.method if hasattr(self.method, "train_vectors") else None

    def checkpoint_method(self) -> TracIn | None:
        """The run's method when its index rows are built checkpoint by checkpoint (``tracin``), else ``None``."""
        return self.method if isinstance(self.method, TracIn) else None

    def index_settings(
        self, precondition: str = PRECONDITION, unit_norm: bool = False, optimizer_state: Any = None
    ) -> dict[str, Any]:
        """What decides the index's rows besides its layout: recorded in ``index/settings.json`` (the store's
        manifest) before the first shard; every key but ``device``, ``precondition``, ``unit_norm`` and
        ``optimizer_state`` (the fingerprints of the AdamW states of ``--precondition adam``) and ``threads``
        (:data:`RECORDED_ONLY`) is required of a store a query reads (:meth:`open_index`). Rows that carry a
        fitted projected curvature (``precondition="fitted"`` of a trak/logra run with a curvature) also record
        the attribution settings the fit was made with (``fisher``, ``damping``, ...; the fit's own
        ``factors``-style record, :meth:`fit_settings`): a store built under another fit is refused."""
        vectors, tracin = self.vectors(), self.checkpoint_method()
        fitted_rows = isinstance(vectors, ProjectedInfluence) and vectors.use_curvature and precondition == "fitted"
        extra: dict[str, Any] = {"precondition": precondition, "unit_norm": unit_norm}
        if tracin is not None:
            blocks = [[name, *shape] for name, shape in tracin.row_blocks()]
            layout = {"projection": tracin.vector_settings(), "blocks": blocks}
        elif vectors is None:
            layout = {"projection": "none", "blocks": selection_signature(self.attributor.modules)}
            extra = extra if precondition == "adam" else {}
        else:
            blocks = [[name, *shape] for name, shape in vectors.vector_blocks()]
            layout = {"projection": vectors.vector_settings(), "blocks": blocks}
        if optimizer_state is not None:
            extra["optimizer_state"] = optimizer_state
        return {
            # an index row is the same bytes under any process count (each row is computed alone)
            **{
                k: v for k, v in self.fit_settings().items() if k != "processes" and (k != "attribution" or fitted_rows)
            },
            "gradients": train_gradient_settings(self.config.attribution),
            "rows_layout": layout,
            **extra,
        }

    def build_index(
        self,
        shard_size: int = SHARD_SIZE,
        dtype: str = DTYPE,
        precondition: str = PRECONDITION,
        unit_norm: bool = False,
        optimizer_checkpoint: str | Path | None = None,
    ) -> int:
        """Write the training set's rows as a :class:`wherefrom.core.vectors.VectorStore` in ``RUN/index/``;
        resumes. Returns the shards written now.

        An influence run (raw gradients: the store's "projection none"): row ``i`` is training row ``i``'s
        per-example gradient, every module's ``(out, in')`` block flattened and concatenated in module order
        (:func:`wherefrom.core.gradients.flatten_blocks`); the curvature is applied to the queries when scoring.
        After :meth:`fit` with ``keep_gradients=True`` in this process, these rows are the fit's kept gradients
        (no training pass) when ``shard_size`` is a multiple of the batch size (each shard whole batches of the
        fit's, so a shard recomputed on resume has the same bytes); else they are recomputed, with a notice.
        A fitted ``trak``/``logra``/``repsim`` run: the method's ``train_vectors`` (projected gradients, with
        ``precondition="fitted"`` multiplied by the fitted ``(F~ + lambda I)^-1``, with ``unit_norm`` unit
        length; repsim: unit hidden states), so that a score is ``query_vector @ row``.
        ``precondition="empirical"`` (a trak/logra run of the ``exact`` strategy, fitted or not): one pass
        stores the raw projected gradients ``G~``, then :meth:`fit_preconditioner` fits the empirical projected
        Fisher of the stored rows into ``RUN/index/preconditioner/`` before the completion marker, and the
        queries carry it (:meth:`query_vectors`): ``q~ . (F~ + lambda I)^-1 G~``, the method's scores with
        ``fisher="empirical"`` without a fitting pass.
        A fitted ``tracin`` run (TracInCP, Pruthi et al. 2020): ``sum_c lr_c g_c(q) . g_c(z)`` is the inner
        product of the rows ``[sqrt(lr_c) g_c(z)]_c`` (:meth:`wherefrom.methods.tracin.TracIn.checkpoint_rows`,
        laid out by :func:`wherefrom.methods.tracin.interleave_checkpoints`), built checkpoint-outer: each
        checkpoint is loaded once and writes its column block of this process's pending shards into a store of
        its own under ``RUN/index-parts/checkpoint-C/`` (resumable like any store), from which the index shards
        are assembled; the parts are deleted once the index is complete.
        ``precondition="adam"`` (LESS, Xia et al. 2024; TrackStar, Chang et al. 2024) divides each per-example
        gradient elementwise by AdamW's ``sqrt(v_hat) + eps`` (:mod:`wherefrom.models.optimizer_state`) before
        projection and normalisation: of ``optimizer_checkpoint`` (default:
        :meth:`default_optimizer_checkpoint`) for raw gradients (a run fitted with the ``identity`` strategy: the
        rows carry the preconditioner) and trak, of each checkpoint's own state for tracin; the queries are not
        divided (LESS's convention).
        Rows are stored in ``dtype`` (float32 | float16 | bfloat16), ``shard_size`` rows per shard.

        Under ``torch.distributed`` rank ``r`` of ``W`` builds the shards ``k`` with ``k % W == r``
        (:func:`wherefrom.core.distributed.shards_for_rank`) and rank 0 writes the completion marker once
        all are intact, so the store's bytes equal a one-process build; returns the shards of all ranks.

        Holds the run's writer lock; records the settings first and refuses to resume under other
        ones (:class:`wherefrom.core.store.SettingsMismatch` names e.g. ``shard_size: recorded 4, now 2``);
        rewrites every shard that is missing, unfinished or damaged (noted in :attr:`notices`). Raises
        ``ValueError`` for a method without vector rows or not yet fitted, ``precondition``/``unit_norm`` on an
        influence run, a bad ``shard_size``, ``dtype`` or ``precondition`` (fitted | none | adam | empirical),
        a trak/logra run scored with ``normalize="cosine"`` unless it has no curvature and the index is
        ``none`` with ``unit_norm`` (the only rows whose products are its scores),
        ``empirical`` outside an ``exact`` trak/logra run, with ``unit_norm``, or on a run scored with the true
        Fisher (:meth:`check_empirical`; :class:`wherefrom.core.memory.MemoryLimitError` when its
        Fisher would not fit), ``adam`` where
        the full per-example gradient is never formed (logra, repsim) or on an influence run with a curvature,
        :class:`wherefrom.models.optimizer_state.MissingOptimizerState` naming a checkpoint folder without an
        AdamW state, and ``OSError`` naming the shard whose write failed (a full disk; the finished shards are
        kept).
        """
        # Rows from the gradients the fit kept are computed with the fit's thread count: the index records and (on
        # resume) recomputes with that count too.
        kept = self.attributor.kept_gradients(self.train)
        with self.threads_as_recorded(self.folder / "factors", note=False) if kept is not None else nullcontext():
            return self._write_index(shard_size, dtype, precondition, unit_norm, optimizer_checkpoint, kept)

    def _write_index(
        self,
        shard_size: int,
        dtype: str,
        precondition: str,
        unit_norm: bool,
        optimizer_checkpoint: str | Path | None,
        kept: Kept | None,
    ) -> int:
        """:meth:`build_index` at the thread count it chose (``kept``: the fit's kept gradients of the rows)."""
        checked = not self.has_index()  # index_writer then checks every row's encoding (check_encodings)
        writer, prepare, produce = self.index_writer(
            shard_size, dtype, precondition, unit_norm, optimizer_checkpoint, kept
        )

        def hint(finished: bool) -> Callable[[list[str]], str]:
            """What to do when the store was started with other settings (``differing``, dotted keys): the command
            of the recorded ones where only options differ, else delete the store (no option brings back the
            inputs it was built from)."""

            def said(differing: list[str]) -> str:
                chosen = {*INDEX_OPTIONS, *(WITH_PRECONDITION if "precondition" in differing else ())}
                if "optimizer_state.checkpoint" in differing:  # another --optimizer-checkpoint: another state
                    chosen.add("optimizer_state")
                if not all(name.split(".")[0] in chosen for name in differing):
                    return (
                        "No `wherefrom index` option chooses what differs (the run's weights, checkpoints, training "
                        f"rows or method settings changed since): delete {writer.folder} and rerun to index with the "
                        f"current ones (`{self.index_command(device=False)}` keeps the recorded layout)."
                    )
                # a finished store is reused on any device; a resumed one runs where it started
                state = (
                    f"It is finished: `{self.index_command(device=False)}` reuses it"
                    if finished
                    else sentence(self.resume_advice())  # it follows the refusal's full stop
                )
                return f"{state}; or delete {writer.folder} to index with the new settings."

            return said

        def begin() -> bool:
            finished = writer.complete()
            marked = finished or (writer.folder / MARKER).exists()  # finished with another shard size: not "resume"
            # A finished index is reused on any device; a resumed one must run where it started.
            if writer.start(hint(marked), ignore=("device",) if finished else ()):  # unknown settings discarded
                finished = writer.complete()
            misplaced = writer.misplaced() if finished else []
            if misplaced:  # settings agree, yet a shard holds other rows: rebuilt (pending names it)
                forget_file(writer.folder / MARKER)
                finished = False
            problem = self.preconditioner_damage() if precondition == "empirical" else None
            if finished and problem is not None:  # refitted from the intact shards, then marked complete again
                self.notices.append(f"refitting the index's preconditioner: {problem}")
                forget_file(writer.folder / MARKER)
                finished = False
            return finished

        written = 0
        with held_by_main(lambda: writer_lock(self.folder)):
            writer.guard = holder_guard(self.folder)  # an orphaned rank (rank 0 died) stops once a rerun takes over
            try:
                if not on_main(begin):  # rank 0 records the settings; the others then check them
                    if not is_main():  # rank 0's start cleared the stop record: a rank that stopped since keeps its
                        writer.start(hint(False), forget_stop=False)
                    with self.threads_as_recorded(writer.folder), warnings.catch_warnings():
                        if checked:  # check_encodings said it once for every row (it was said for each shard)
                            warnings.simplefilter("ignore", TokenBoundaryWarning)
                        prepare(rank(), world_size())  # resumed shards computed as the first ones
                        written = writer.build(produce, rank(), world_size())  # shards k with k % W == rank
                        barrier()
                        if precondition == "empirical":
                            self.fit_preconditioner(writer)
                    on_main(writer.finalize)
                on_main(lambda: shutil.rmtree(self.folder / INDEX_PARTS, ignore_errors=True))
            finally:
                self.notices += list(dict.fromkeys(writer.notices))  # a damaged shard is noted once
        return sum_counts({"written": written})["written"]

    def fit_preconditioner(self, writer: VectorStoreWriter) -> None:
        """Fit an ``empirical`` index's preconditioner (the projected Fisher of the stored raw rows, read back
        verified: :meth:`wherefrom.methods.projection.ProjectedInfluence.row_curvature`) and save it in
        ``RUN/index/preconditioner/`` (checksummed). Rank 0 alone reads every shard in order, so the factors
        are a function of the shards' bytes: a build resumed, or made by any number of processes, saves the
        same bytes. (Cost: a read of the store and a ``k x k`` product per module and row, small beside the
        model pass that wrote them.)"""
        built = VectorStore(writer.folder, writer.manifest, writer.ids)  # every shard intact, not yet marked

        def fit() -> None:
            with alone():
                curvature = self.method.row_curvature(lambda: (rows for _start, rows in built.shards()))
            curvature.save(writer.folder / PRECONDITIONER)

        on_main(fit)

    def preconditioner_damage(self) -> str | None:
        """What is wrong with ``RUN/index/preconditioner/`` (missing or damaged), or ``None`` when it is intact.
        Raises ``IsADirectoryError`` naming a folder in the place of one of its files (not refitted over: a writer
        would remove the index's marker and refit, then fail)."""
        files = [self.folder / "index" / PRECONDITIONER / name for name in (CURVATURE_TENSORS, CURVATURE_META)]
        refuse_folder_in_place(*files)
        return next((problem for problem in map(damage, files) if problem), None)

    def default_optimizer_checkpoint(self) -> Path:
        """The checkpoint folder whose AdamW state ``--precondition adam`` uses by default: the run's adapter (or
        model) folder when it is a :func:`wherefrom.models.finetune.finetune` checkpoint itself, else the last
        epoch checkpoint of the fine-tuning run whose final weights it is.

        Raises :class:`wherefrom.models.optimizer_state.MissingOptimizerState` when the run's weights are neither
        (e.g. the default model), saying to give the folder, and ``FileNotFoundError`` when that fine-tuning run
        kept no epoch checkpoints (:func:`wherefrom.methods.tracin.finetune_checkpoints`)."""
        weights = self.config.adapter or self.config.model
        folder = Path(weights) if weights is not None else None
        if folder is not None and any((folder / name).is_file() for name in (TRAINER_STATE_FILE, OPTIMIZER_STATE_FILE)):
            return folder
        if folder is not None and (folder.parent / FINETUNE_CONFIG).is_file():
            return finetune_checkpoints(folder.parent)[-1]
        raise MissingOptimizerState(
            f"--precondition adam: the run's weights ({weights or 'the default model'}) are not the output of "
            "`wherefrom finetune`, so no AdamW state goes with them; give the checkpoint folder "
            "(--optimizer-checkpoint)"
        )

    def index_writer(
        self,
        shard_size: int = SHARD_SIZE,
        dtype: str = DTYPE,
        precondition: str = PRECONDITION,
        unit_norm: bool = False,
        optimizer_checkpoint: str | Path | None = None,
        kept: Kept | None = None,
    ) -> tuple[
        VectorStoreWriter,
        Callable[[int, int], None],
        Callable[[int, list[str]], Iterator[tuple[list[str], torch.Tensor]]],
    ]:
        """The writer of ``RUN/index/``, the step before its shards (``prepare(rank, world)``: a tracin run's
        checkpoint column blocks, nothing for others) and the producer of its rows (see :meth:`build_index`;
        same errors, raised here before any write): the parts a distributed build calls itself. ``kept``: the
        per-example gradients the fit kept of these rows (:meth:`wherefrom.engine.api.Attributor.kept_gradients`),
        read instead of a training pass where the shards start batches of the fit's. Each process
        calls ``writer.start()`` (rank 0 first, the others after a barrier), ``prepare(rank, world)``,
        ``writer.build(produce, rank, world)``, and after a barrier rank 0 calls ``writer.finalize()``."""
        if self.method is not None and not self.method_fitted and (self.folder / "method" / META_FILE).exists():
            load_fitted(self.method, self.folder / "method", self.train)
            self.method_fitted = True
        vectors, tracin = self.vectors(), self.checkpoint_method()
        raw = vectors is None and tracin is None  # an influence run's raw gradients (or no rows at all)
        unfitted_rows = isinstance(vectors, ProjectedInfluence) and precondition in UNFITTED_PRECONDITIONS
        if not self.config.indexable or (self.method is not None and not self.method_fitted and not unfitted_rows):
            why = "its train side is not a vector per row" if raw else "before it is fitted"
            raise ValueError(
                f"method {self.config.method!r} has no per-row gradient index ({why}); "
                + (
                    f"`wherefrom scores --run {self.folder}` scores it from its fitted state"
                    if raw
                    else "run `wherefrom fit` first"
                )
            )
        if precondition not in PRECONDITIONS:
            raise ValueError(f"precondition must be one of {', '.join(PRECONDITIONS)}, got {precondition!r}")
        adam = precondition == "adam"
        if precondition == "empirical":
            self.check_empirical(unit_norm)
        cosine = isinstance(vectors, ProjectedInfluence) and vectors.attributor.config.normalize == "cosine"
        if cosine and not (precondition == "none" and unit_norm and not vectors.use_curvature):
            raise ValueError(
                f"this {self.config.method} run scores with normalize='cosine' (each score divided by the "
                "preconditioned query's and the training gradient's norms), which the products of these index rows "
                "do not give; score it without an index, or index a run fitted with --option curvature=false "
                "using --precondition none --unit-norm (the cosine of the raw projected gradients)"
            )
        given = [
            flag for flag, on in (("--precondition none", precondition == "none"), ("--unit-norm", unit_norm)) if on
        ]
        if raw and given:  # userL: it named both flags, also when only --unit-norm was given beside a valid adam
            raise ValueError(
                f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to the index of a trak/logra/repsim/tracin run; an influence run "
                "stores raw gradients (--precondition fitted, or adam) and applies its curvature to the queries"
            )
        self.check_adam(precondition, optimizer_checkpoint)
        if tracin is not None and tracin.config is not None and tracin.config.normalize == "cosine" and not unit_norm:
            raise ValueError(
                "this tracin run scores with normalize='cosine' (sum_c lr_c cos): its index needs --unit-norm "
                "(each checkpoint's gradient of unit length), or a product search would rank other scores"
            )
        fingerprint: Any = None
        if adam:
            folders = (
                tracin.checkpoints
                if tracin is not None
                else [optimizer_checkpoint or self.default_optimizer_checkpoint()]
            )
            fingerprint = [AdamState.fingerprint(folder) for folder in folders]
            fingerprint = fingerprint if tracin is not None else fingerprint[0]
        folder = self.folder / "index"
        names = self.attributor.module_names
        settings = self.index_settings(precondition, unit_norm, fingerprint)
        dim = sum(math.prod(shape) for _name, *shape in settings["rows_layout"]["blocks"])
        ids = [r.id for r in self.train]
        writer = VectorStoreWriter(
            folder,
            ids,
            dim,
            settings,
            dtype,
            shard_size,
            {**self.config.setting_defaults(), **UNRECORDED_INDEX_OPTIONS},
            RECORDED_ONLY,
        )
        if not self.has_index():  # a store to build or finish
            self.check_encodings()  # a row the model cannot take is named now, not when its shard comes
            if raw:  # predicted before anything is written
                rows, size = min(shard_size, len(self.train)), self.attributor.num_parameters
                check_memory(
                    {
                        f"one index shard ({rows} rows x {size:,} parameters, {dtype}, parts and joined)": 2
                        * nbytes(rows, size, dtype=DTYPES[dtype]),
                        "per-example gradients of one batch (float32)": nbytes(self.attributor.config.batch_size, size),
                    },
                    "building the gradient index",
                    self.attributor.device,
                    "Use a smaller shard_size or dtype bfloat16.",
                )
        if tracin is not None:
            return writer, *self.checkpoint_parts(writer, adam, unit_norm)
        divisors = None
        # the gradients the fit kept in this process (Run.fit(keep_gradients=True)): no training pass. Used
        # when each shard starts a batch of the fit's, so a shard recomputed on resume has the same bytes
        kept = kept if raw else None
        if kept is not None and shard_size % self.attributor.config.batch_size:
            kept = None
            self.notices.append(
                f"the fit's kept gradients were not used for the index: shard_size {shard_size} is not a multiple "
                f"of batch_size {self.attributor.config.batch_size}, so its batches differ from the fit's and the "
                "gradients are recomputed (the same rows, rounded differently, to about 1e-7 relative)"
            )
        if adam:
            state = AdamState.load(fingerprint["checkpoint"])
            divisors = {n: d.to(self.attributor.device) for n, d in state.divisors(self.attributor.modules).items()}

        def produce(shard: int, _ids: list[str]) -> Iterator[tuple[list[str], torch.Tensor]]:
            start, stop = writer.span(shard)
            if vectors is not None:
                rows = (self.train[start:stop], precondition == "fitted", unit_norm)
                # only a method that forms the gradients (trak) takes divisors (check_adam refused the others)
                yield from vectors.train_vectors(*rows) if divisors is None else vectors.train_vectors(*rows, divisors)
                return
            description = f"index shard {shard + 1}/{writer.shard_count}"
            if kept is not None:
                source = kept_rows(kept, start, stop)
            else:
                source = self.attributor.gradients(self.train[start:stop], description=description)
            for ids, grads in source:
                if divisors is not None:
                    grads = {n: g / divisors[n] for n, g in grads.items()}
                yield ids, flatten_blocks(grads, names)

        return writer, lambda _rank, _world: None, produce

    def check_encodings(self) -> None:
        """Tokenize every training row, :data:`ENCODE_CHECK_ROWS` at a time (not kept), before an index's pass: a row
        the model cannot take raises its :class:`wherefrom.core.data.DataError` now, not when its shard comes. Rows
        whose prompt/completion boundary tokenizes otherwise than their joined text are warned of once
        (:class:`wherefrom.core.encoding.TokenBoundaryWarning`: the first block's message, with the rows of every
        block added up); other warnings of the encoding come with the shards."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for start in range(0, len(self.train), ENCODE_CHECK_ROWS):
                self.attributor.encode(self.train[start : start + ENCODE_CHECK_ROWS])
        boundary = [w.message for w in caught if isinstance(w.message, TokenBoundaryWarning)]
        if boundary:
            total = sum(message.differ for message in boundary)
            also = (
                f" ({total} of {len(self.train)} rows in all, in {len(boundary)} blocks of {ENCODE_CHECK_ROWS} rows)"
                if len(boundary) > 1
                else ""
            )
            warnings.warn(TokenBoundaryWarning(f"{boundary[0]}{also}", total), stacklevel=2)

    def check_empirical(self, unit_norm: bool) -> None:
        """Refuse ``--precondition empirical`` where it does not apply (``ValueError`` naming why and what to use
        instead): outside a trak/logra run of the ``exact`` strategy, with ``unit_norm``, or on a run whose scores
        use another Fisher (the true one); and check the Fisher's memory before the pass
        (:class:`wherefrom.core.memory.MemoryLimitError`)."""
        vectors = self.vectors()
        if not (isinstance(vectors, ProjectedInfluence) and vectors.strategy == "exact"):
            if isinstance(vectors, ProjectedInfluence):
                this = (
                    f"method {self.config.method!r} with strategy {vectors.strategy!r}; use --precondition fitted "
                    "(its own Kronecker factors), or fit a logra run of the exact strategy with --option curvature=false"
                )
            elif self.method is not None:
                this = f"method {self.config.method!r}; drop --precondition"
            else:
                this = (
                    "an influence run (its index stores raw gradients and its curvature goes to the queries); "
                    "drop --precondition"
                )
            raise ValueError(
                "--precondition empirical fits the dense projected Fisher of the stored rows: it applies to a trak "
                f"or logra run of the exact strategy, not to {this}"
            )
        if unit_norm:
            raise ValueError(
                "--unit-norm divides each preconditioned row by its norm, which --precondition empirical only knows "
                "after the pass (its rows are stored raw); use --unit-norm with --precondition fitted on a run fitted "
                "with its projected Fisher"
            )
        if vectors.use_curvature and vectors.attributor.config.fisher != "empirical":
            raise ValueError(
                f"this {self.config.method} run scores with its own projected Fisher "
                f"(fisher={vectors.attributor.config.fisher!r}), which an empirical index would replace by the "
                "empirical Fisher of the stored rows (other scores); index it with --precondition fitted, or "
                "fit a run with --option curvature=false (or --fisher empirical) for --precondition empirical"
            )
        vectors.check_row_fisher_memory()  # the k x k Fisher fitted after the pass, checked now

    def check_adam(self, precondition: str, optimizer_checkpoint: str | Path | None) -> None:
        """Refuse ``--precondition adam`` (or ``--optimizer-checkpoint``) where it does not apply, naming why and
        what to use instead (``ValueError``)."""
        vectors, tracin = self.vectors(), self.checkpoint_method()
        if precondition != "adam":
            if optimizer_checkpoint is not None:
                raise ValueError("--optimizer-checkpoint applies to --precondition adam only")
            return
        if tracin is not None and optimizer_checkpoint is not None:
            raise ValueError(
                "--optimizer-checkpoint does not apply to a tracin run: each checkpoint's gradients are divided by "
                "that checkpoint's own AdamW state"
            )
        if vectors is not None and not getattr(vectors, "forms_gradients", False):
            why = (
                "LoGra's Kronecker projection works on the per-token factors (P_out g_t)(P_in a_t)^T and never forms it"
                if self.config.method == "logra"
                else "its rows are not gradients"
            )
            raise ValueError(
                f"--precondition adam divides each full per-example gradient elementwise, and method "
                f"{self.config.method!r} cannot ({why}); index a trak run (it projects the full gradient) or an "
                "influence run fitted with --strategy identity (raw gradients) for AdamW-preconditioned rows, or "
                "use --precondition fitted|none"
            )
        strategy = self.config.attribution.strategy
        if vectors is None and tracin is None and strategy != "identity":
            raise ValueError(
                f"--precondition adam stores AdamW-preconditioned gradients, which take the place of a curvature; "
                f"this run applies {strategy!r} to the queries: index a run fitted with --strategy identity "
                "(gradient similarity; LESS), or drop --precondition adam"
            )
        if optimizer_checkpoint is not None:
            refuse_stateless_checkpoint(Path(optimizer_checkpoint))

    def checkpoint_parts(
        self, writer: VectorStoreWriter, adam: bool, unit_norm: bool
    ) -> tuple[Callable[[int, int], None], Callable[[int, list[str]], Iterator[tuple[list[str], torch.Tensor]]]]:
        """``(prepare, produce)`` of a tracin run's index (see :meth:`build_index`): ``prepare(rank, world)`` fills
        each checkpoint's store ``RUN/index-parts/checkpoint-C/`` (``D`` columns: ``sqrt(lr_c) g_c``) for the
        index shards this process still has to build, loading each checkpoint once (and not at all when its part
        is intact); ``produce`` assembles an index shard from the parts' same shard."""
        tracin = self.checkpoint_method()
        signature = tracin.module_signature()
        sizes = [math.prod(shape[1:]) for _name, shape in tracin.row_blocks()]
        part_settings = {k: v for k, v in writer.manifest.items() if k not in LAYOUT}
        parts = [
            VectorStoreWriter(
                self.folder / INDEX_PARTS / f"checkpoint-{c}",
                writer.ids,
                sum(sizes),
                {**part_settings, "part": c},
                writer.dtype,
                writer.shard_size,
                writer.defaults,
                writer.unchecked,
            )
            for c in range(len(tracin.checkpoints))
        ]
        hint = f"Delete {self.folder / INDEX_PARTS} to index with the current settings."

        def begin(part: VectorStoreWriter) -> None:
            try:
                part.start(hint)
            except SettingsMismatch:  # the index accepted these settings: a part of other ones is stale
                shutil.rmtree(part.folder)
                self.notices.append(f"discarded {part.folder}: built with other settings")
                part.start(hint)

        def prepare(rank: int, world: int) -> None:
            todo = writer.pending(rank, world)
            for c, part in enumerate(parts):
                part.guard = writer.guard  # the parts' shards too: an orphaned rank stops before any of them
                part.owner = writer.folder  # a row the dtype cannot hold: the index is what is rebuilt
                on_main(lambda part=part: begin(part))
                if not is_main():
                    part.start(hint)
                loaded: dict[str, Any] = {}

                def rows(shard: int, _ids: list[str], c: int = c, loaded: dict = loaded) -> Iterator:
                    if not loaded:  # the checkpoint is loaded for its first missing block only
                        attributor = tracin.checkpoint_attributor(c, like=signature)
                        state = AdamState.load(tracin.checkpoints[c]) if adam else None
                        loaded["divisors"] = None if state is None else state.divisors(attributor.modules)
                        loaded["attributor"] = attributor
                    start, stop = writer.span(shard)
                    yield from tracin.checkpoint_rows(
                        loaded["attributor"], c, self.train[start:stop], loaded["divisors"], unit_norm
                    )

                part.build(rows, rank, world, only=todo)
                self.notices += part.notices
                loaded.clear()
                gc.collect()

        def produce(shard: int, ids: list[str]) -> Iterator[tuple[list[str], torch.Tensor]]:
            blocks = [next(VectorStore(p.folder, p.manifest, p.ids).shards(only=[shard]))[1] for p in parts]
            yield ids, interleave_checkpoints(blocks, sizes)

        return prepare, produce

    def has_index(self) -> bool:
        return (self.folder / "index" / MARKER).exists()

    def index_manifest(self, unchecked: bool = False) -> dict[str, Any] | None:
        """``RUN/index/settings.json`` as recorded when the index was started (finished or not), or ``None``
        when it is missing or damaged; ``unchecked``: also one whose checksum is lost (``checksums.json`` gone:
        :func:`wherefrom.core.store.unchecked_json`), for what a hint or a refusal says, never for results."""
        recorded = self.recorded_settings(self.folder / "index")
        if recorded is None and unchecked:
            recorded = unchecked_json(self.folder / "index" / SETTINGS)
        return recorded if isinstance(recorded, dict) else None

    def unfinished_empirical_index(self) -> bool:
        """Whether ``RUN/index/`` is an unfinished ``--precondition empirical`` index (no completion marker): its
        manifest (read ``unchecked``) records it, or, with the manifest lost, a preconditioner folder is there."""
        if self.has_index():
            return False
        recorded = self.index_manifest(unchecked=True) or {}
        return recorded.get("precondition") == "empirical" or (self.folder / "index" / PRECONDITIONER).is_dir()

    def resume_advice(self) -> str:
        """What finishes the unfinished ``RUN/index/``: ```COMMAND` finishes it`` (:meth:`index_command`), or,
        when its last build stopped on a row the store cannot hold (:func:`wherefrom.core.vectors.stop_reason`), that
        error: the same command computes the same row and stops again."""
        reason = stop_reason(self.folder / "index")
        if reason is not None:
            return f"its build stopped on a row it cannot store, and the same command stops there again: {reason}"
        return f"`{self.index_command()}` finishes it"

    @staticmethod
    def recorded_settings(folder: Path) -> dict[str, Any] | None:
        """``folder/settings.json`` (a fit's or an index's recorded settings), or ``None`` when it is missing or
        damaged."""
        return intact_json(Path(folder) / SETTINGS)

    def index_command(self, device: bool = True) -> str:
        """The ``wherefrom index`` command that resumes or repairs ``RUN/index/`` with the options its manifest
        recorded. A manifest without its checksum (``checksums.json`` lost: the store is rebuilt whole) still gives
        them, read unchecked (:func:`wherefrom.core.store.unchecked_json`), so the rebuild keeps the layout the user
        chose. When the manifest is missing or damaged, what survives says what was built: a completion marker
        (intact, or without its checksum) its ``--shard-size`` and ``--dtype``, a preconditioner folder
        ``--precondition empirical``; else the plain command. ``device=False``: without the recorded ``--device``
        (a resumed index runs where it started; a finished one, or one deleted and built again, on any)."""
        index = self.folder / "index"
        settings = self.index_manifest(unchecked=True) or {}
        recorded = settings if {"shard_size", "dtype"} <= set(settings) else {}
        layout = recorded or intact_json(index / MARKER) or unchecked_json(index / MARKER)
        layout = layout if isinstance(layout, dict) else {}
        if recorded:
            precondition = recorded.get("precondition")
        else:
            precondition = "empirical" if (index / PRECONDITIONER).is_dir() else None
        state, recorded_device, size = recorded.get("optimizer_state"), recorded.get("device"), layout.get("shard_size")
        # an option whose recorded value is not one the command takes (a file edited by hand) is left out
        options = {
            "--shard-size": size if type(size) is int and size >= 1 else None,
            "--dtype": layout.get("dtype") if layout.get("dtype") in DTYPES else None,
            "--precondition": precondition if precondition in PRECONDITIONS else None,
            # one AdamW state (a tracin run uses each checkpoint's own)
            "--optimizer-checkpoint": state.get("checkpoint") if isinstance(state, dict) else None,
            "--device": recorded_device if device else None,  # a resumed index runs where it started
        }
        words = ["wherefrom", "index", "--run", str(self.folder)]
        for flag, value in options.items():
            if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value):
                words += [flag, str(value)]
        if recorded.get("unit_norm") is True:
            words.append("--unit-norm")
        return shlex.join(words)

    def open_index(self, verify: bool = True) -> VectorStore:
        """The run's finished index, its marker, manifest and the checksum of every shard this process reads
        verified (all of them in one process; under ``torch.distributed`` its share,
        :func:`wherefrom.core.distributed.shards_for_rank`, so no shard is hashed twice), and its settings required
        to be this run's (model, tokenizer, module selection, gradient settings, layout). ``verify=False``: the
        shards are not hashed now but as they are first read (:meth:`wherefrom.core.vectors.VectorStore.shards`,
        ``blocks``), for a search in one process: it reads each shard once, not twice, or none at all (a saved
        FAISS index searched without the exact search), and a damaged shard stops it before any result.

        Raises :class:`wherefrom.core.store.DamagedFile` naming a damaged file and
        :class:`wherefrom.core.store.SettingsMismatch` naming each setting that differs."""
        store = self._index_store(verify=verify)
        now = self.index_settings(store.settings.get("precondition", PRECONDITION))
        store.require(
            {k: v for k, v in now.items() if k not in ("device", "precondition", "unit_norm", *RECORDED_ONLY)},
            f"run {self.folder}",
            self.config.setting_defaults(),
            # built only on a refusal: the command reads the index's manifest and marker again
            lambda: (
                self.other_rows(store)
                + f"delete {store.folder} and rerun `{self.index_command(device=False)}` to rebuild it with the "
                "current ones"
            ),
        )
        return store  # its ids are the run's: the settings hold the rows' fingerprint, the store its ids' digest

    def other_rows(self, store: VectorStore) -> str:
        """``""`` when ``store`` indexes the run's training ids in order, else a sentence (ending ``"; "``) naming both
        sets of rows and the run's training file: their counts and first ids, or, for as many rows, the first row
        where they differ (a store of the same rows in another order). userD read only ``data: recorded '98d4...',
        now '8d54...'`` for a store copied from a run of another training file."""
        ids = [r.id for r in self.train]
        if store.ids == ids:
            return ""
        if store.count == len(ids):
            row = next(i for i, (a, b) in enumerate(zip(store.ids, ids)) if a != b)
            return (
                f"row {row} of the store is {store.ids[row]!r}, not {ids[row]!r} as in this run's training file "
                f"{self.config.train} (both {len(ids)} rows); "
            )
        first = repr(store.ids[0]) if store.ids else "none"
        return (
            f"the store indexes {store.count} rows (the first {first}), not the {len(ids)} rows of this run's "
            f"training file {self.config.train} (the first {ids[0]!r}); "
        )

    def _index_store(self, verify: bool) -> VectorStore:
        """``RUN/index/`` opened (with ``verify`` every shard this process reads hashed); a :class:`wherefrom.core.store.DamagedFile`
        names the damaged file and the command that rebuilds it."""
        with self.rebuild_named():
            store = VectorStore.open(self.folder / "index")
            if verify:  # every process hashes its own share; a damaged shard stops them all
                on_every(lambda: store.verify(shards_for_rank(store.shard_count)))
        return store

    @contextmanager
    def rebuild_named(self) -> Iterator[None]:
        """A :class:`wherefrom.core.store.DamagedFile` raised inside (a damaged file of the run's index, found when
        it is opened or read) names the command that rebuilds the index, in place of the store's general advice."""
        try:
            yield
        except DamagedFile as error:
            raise DamagedFile(f"{str(error).removesuffix(f'; {REBUILD}')}; {self._rebuild_hint()}") from None

    def _rebuild_hint(self) -> str:
        return f"{REBUILD}: rerun `{self.index_command()}`"

    def indexed_gradients(
        self, store: VectorStore | None = None, shards: Sequence[int] | None = None
    ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """``(ids, {module: (n, out, in')})`` per shard of the run's complete index (``store``: already opened
        by :meth:`open_index`; ``shards``: only these, e.g. one rank's share), as float32; each shard is
        verified as it is read (:class:`wherefrom.core.store.DamagedFile` names it)."""
        store = store or self.open_index()
        shapes = [(m.name, m.shape) for m in self.attributor.modules]
        with self.rebuild_named():
            for start, rows in store.shards(only=shards):
                yield store.ids[start : start + rows.shape[0]], split_rows(rows.float(), shapes)

    # --- scores --------------------------------------------------------------------------------
    def scores(self, queries: list[Record], curvature: Curvature | None = None) -> Scores | None:
        """Pairwise scores of ``queries`` against the training set (from the index when complete).

        Under ``torch.distributed`` every process scores all queries against its share of the training
        rows (:func:`wherefrom.core.distributed.rows_for_rank`, or of the index shards,
        :func:`wherefrom.core.distributed.shards_for_rank`); rank 0 gets the columns of all of them in
        training-row order and returns the scores, the other ranks return ``None``. A method outside the
        influence family refuses (:class:`wherefrom.core.distributed.NotDistributable`).

        ``curvature`` overrides the run's fitted one (e.g. identity on the same index); a run of a method
        outside the influence family scores with its fitted state, a trak/logra/repsim/tracin run from its
        finished index when it has one (an unfitted trak/logra run only from its index). ``RuntimeError``
        when there is neither, and for an unfinished ``empirical`` index (its scores are another estimator
        than the fitted method's: finish the index or delete it).
        Raises :class:`~wherefrom.core.data.DataError` for no queries, an invalid row or a repeated id.
        """
        queries = checked_rows(queries, "query rows")
        if self.method is not None:
            refuse_distributed_scores(self.config)
            if self.unfinished_empirical_index():
                raise RuntimeError(
                    f"{self.folder / 'index'} is an unfinished --precondition empirical index (no {MARKER}): "
                    f"{self.resume_advice()}; or delete it to score without the index"
                )
            if not self.method_fitted and not (self.vectors() is not None and self.has_index()):
                raise RuntimeError(f"no fitted {self.config.method} in {self.folder / 'method'}; {self.fit_advice()}")
            if self.scores_from_index():
                return self.store_scores(queries, self.open_index())
            return self.method.scores(queries, self.train)
        self.attributor.check_scoring_memory(len(queries), len(self.train))
        curvature = curvature or self.attributor.curvature
        if curvature.needs_fit and not curvature.state:
            raise RuntimeError(f"no fitted curvature in {self.folder / 'factors'}; {self.fit_advice()}")
        store = self.open_index() if self.scores_from_index() else None  # a damaged one refused before the query work
        query_ids, pre = self.attributor.preconditioned_queries(queries, curvature)
        if store is not None:
            train = self.indexed_gradients(store, shards_for_rank(store.shard_count))
        else:
            share = rows_for_rank(self.train)  # empty for some process when there are fewer rows than processes
            train = self.attributor.train_gradient_stream(share) if share else iter(())
        part = self.attributor.scores_from_gradients(query_ids, pre, train)
        if world_size() == 1:
            return part
        train_ids, per_module = gather_columns(part.train_ids, part.per_module, [r.id for r in self.train])
        return Scores(query_ids, train_ids, part.module_names, per_module) if is_main() else None

    def fit_advice(self) -> str:
        """What a reader finding no fitted state says: to run ``wherefrom fit``, or, while a process writes the run
        (:func:`wherefrom.core.store.writing_now`), to wait for it (a `query` during a running `fit` was told to
        run `fit`)."""
        writer = None if world_size() > 1 else writing_now(self.folder)  # under torchrun rank 0 of this group holds it
        if writer is None:
            return "run `wherefrom fit` first"
        return f"the run is being written now by {writer}: wait until it finishes"

    def scores_from_index(self) -> bool:
        """Whether :meth:`scores` reads the training side from the run's finished index (an indexable run with
        one, :attr:`RunConfig.indexable`) rather than recomputing it."""
        return self.config.indexable and self.has_index()

    @property
    def similarity(self) -> str | None:
        """The family of the run's method when its scores are a similarity, not influence (repsim's
        ``representation``, bm25's ``lexical``; :func:`wherefrom.methods.registry.similarity_family`), else ``None``:
        what every output of its scores says of their sign and ends."""
        return similarity_family(self.config.method)

    def scores_provenance(self) -> dict[str, Any]:
        """Where :meth:`scores` takes the training side from, recorded in ``scores/<name>.json``:
        ``{"train_side": "recomputed"}`` (gradients, vectors or the method's fitted state, at the run's settings),
        or ``{"train_side": "index", "dtype", "store", "index_options"}``: rows rounded to ``dtype``, ``store``
        the index's :meth:`wherefrom.core.vectors.VectorStore.content_key`, ``index_options`` the
        ``precondition`` / ``unit_norm`` it was built with as its manifest records them (none for an influence
        run's raw gradients unless ``adam``; ``fitted`` applies the run's fitted curvature, so for a run without
        one, repsim or tracin it leaves the rows as ``none`` does; repsim rows are unit length either way)."""
        if not self.scores_from_index():
            return {"train_side": "recomputed"}
        store = self._index_store(verify=False)  # its shards are verified as scores reads them
        options = {key: store.settings[key] for key in ("precondition", "unit_norm") if key in store.settings}
        return {"train_side": "index", "dtype": store.dtype, "store": store.content_key(), "index_options": options}

    def query_vectors(self, queries: list[Record], store: VectorStore) -> tuple[list[str], torch.Tensor]:
        """``(ids, (n_query, store.dim))``: ``queries`` in the layout of the run's index rows, so that a score
        is ``query_vector @ row`` (positive = proponent), the training side of the search
        (:mod:`wherefrom.core.search`). A vector run: the method's query vectors (unit length when the store's
        rows are; for an ``empirical`` index, preconditioned by its stored projected Fisher). An influence run:
        each query's full preconditioned gradient ``(G + lambda I)^-1 q``, flattened as the raw-gradient rows are
        (a ``query_rank`` factorisation expanded back). Raises ``ValueError`` for a run scored with
        ``normalize="cosine"``: its scores divide by each row's norm, which a product search does not; and
        :class:`wherefrom.core.store.DamagedFile` naming a missing or damaged preconditioner of an ``empirical``
        index (the next ``index`` refits it); :class:`~wherefrom.core.data.DataError` for an invalid query row (an
        empty completion) or a repeated id, as :meth:`scores` raises, whatever the run's method."""
        vectors = self.vectors() or self.checkpoint_method()
        if vectors is not None and store.settings.get("precondition") == "empirical":
            problem = self.preconditioner_damage()
            if problem is not None:
                raise DamagedFile(f"{problem}; rerun `{self.index_command()}` to refit it")
            return vectors.query_vectors(queries, curvature=load_curvature(store.folder / PRECONDITIONER))
        if vectors is not None:
            return vectors.query_vectors(queries, unit=bool(store.settings.get("unit_norm")))
        if self.attributor.config.normalize == "cosine":
            raise ValueError(
                f"run {self.folder} scores with normalize='cosine' (each row divided by its gradient norm), which a "
                "search of query_vector @ row cannot rank; use `wherefrom scores` without --search"
            )
        ids, pre = self.attributor.preconditioned_queries(queries)
        dense = {n: block[0] @ block[1].mT if isinstance(block, tuple) else block for n, block in pre.items()}
        return ids, flatten_blocks(dense, self.attributor.module_names).float().cpu()

    def store_scores(self, queries: list[Record], store: VectorStore) -> Scores:
        """Scores of a vector (or tracin) run's ``queries`` from its index: ``query_vector @ row`` per module block
        of the store's recorded layout (a tracin block holds the module's part of every checkpoint, so its
        product is the sum over checkpoints), streamed shard by shard (``(n_modules, q, n)``; positive = proponent)."""
        blocks = [(name, tuple(shape)) for name, *shape in store.settings["rows_layout"]["blocks"]]
        query_ids, query_rows = self.query_vectors(queries, store)
        query_rows = query_rows.float().cpu()
        columns = [block_products(query_rows, rows.float(), blocks) for _start, rows in store.shards()]
        return Scores(query_ids, list(store.ids), [n for n, _ in blocks], torch.cat(columns, dim=2))

    def save_scores(self, scores: Scores, name: str, query_fingerprint: str | None = None, top_k: int = TOP_K) -> Path:
        """Write ``scores/<name>.safetensors``, ``scores/<name>.top.csv`` (``top_k`` rows per query and end) and
        ``scores/<name>.json`` (see :func:`wherefrom.core.scoring.save_scores`, with :meth:`scores_provenance` under
        ``provenance``, the query rows' ``query_fingerprint`` and the sign of a similarity method's scores) under the run's
        writer lock."""
        with writer_lock(self.folder):
            labels = {row.id: row.label for row in self.train}
            provenance = self.scores_provenance()
            return save_scores(
                scores, self.folder / "scores", name, labels, top_k, provenance, query_fingerprint, self.similarity
            )  # fmt: skip
