"""The Typer application and what every command shares: settings as parameters, checks before any
work, ``--threads``, error printing, progress bars, and the record that ``wherefrom replay`` reruns.

Commands live by family in :mod:`wherefrom.cli.run` (fit, index, scores, query),
:mod:`wherefrom.cli.attribute` (attribute, diagnose), :mod:`wherefrom.cli.studies` (finetune,
bench, analyze, groundtruth, evaluate, tune, demo) and :mod:`wherefrom.cli.replay`. Every command
prints where its outputs went; ``--json`` output goes to stdout alone (progress bars go to stderr),
so it can be piped.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
import select
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from tqdm import tqdm

from wherefrom.cli.settings import (
    FLAG_OF_FIELD,
    NEGATED_FLAGS,
    SETTINGS,
    Check,
    Setting,
    check_arguments,
    default_threads,
)
from wherefrom.core.commandline import command_line
from wherefrom.core.distributed import (
    NotDistributable,
    PeersLost,
    World,
    available_cores,
    end_process,
    refuse,
    refuse_other_arguments,
    session,
)
from wherefrom.core.option_pairs import check_methods_named, options_for, parse_option_pairs
from wherefrom.core.store import read_json_object, update_json
from wherefrom.studies.outputs import enclosing_output, folder_makers

__all__ = [
    "COMMANDS",
    "app",
    "changed_settings",
    "command",
    "console",
    "fail",
    "given_settings",
    "group_session",
    "leave_unrecorded",
    "progress",
    "record_only_set",
    "recorded_line",
    "refuse_foreign_folder",
    "refuse_unread_settings",
    "remember",
    "set_settings",
    "settings_as",
    "shown_flags",
]

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Which training examples made a language model say this?"
)
# unwrapped: paths and messages stay copyable and greppable; no emoji codes: ":smile:" in a path, id or device is
# shown as given, not replaced
console = Console(stderr=True, soft_wrap=True, emoji=False)

T = TypeVar("T")

COMMANDS: dict[str, Callable[..., None]] = {}
"""Every command by name, callable with its parameters as keywords (what ``replay`` calls)."""


def progress(batches: Iterable, description: str) -> Iterator:
    """A tqdm bar on stderr over ``batches``."""
    return iter(tqdm(batches, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True))


def fail(error: Exception | str) -> NoReturn:
    """Print ``error`` verbatim (brackets in it are not rich markup), then exit 2."""
    console.print("[bold red]error:[/]", escape(str(error)))
    raise typer.Exit(code=2)


@contextlib.contextmanager
def warnings_above_bars() -> Iterator[None]:
    """The command's Python warnings printed as one line each, ``warning: Category: message``, from the start of
    the line (on a terminal the progress bar there is cleared first; tqdm draws it again below). Printed as Python
    prints them they began on the bar's line, and a terminal showed only their source line (``diagnose``'s
    ``ConvergenceWarning``: a new user's trial). Only the text changes (``warnings.formatwarning``): where and
    whether a warning is shown stays Python's, so ``warnings.catch_warnings(record=True)`` and ``pytest.warns``
    still record a command's warnings."""
    start = "\r\x1b[K" if sys.stderr.isatty() else "\r"

    def one_line(message, category, filename, lineno, line=None) -> str:
        return f"{start}warning: {category.__name__}: {message}\n"

    previous = warnings.formatwarning
    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = previous


@contextlib.contextmanager
def system_errors_named() -> Iterator[None]:
    """An ``OSError`` or ``MemoryError`` out of the block is printed as one error line, exit 2 (:func:`fail`),
    whichever command met it: a full disk, a folder where a file belongs, a file removed underneath (the message
    names the file: :func:`wherefrom.core.store.restated`, ``could not write PATH: reason``), a memory refusal
    (:class:`wherefrom.core.memory.MemoryLimitError` says what would not fit, and the limit), or an allocation that
    failed (``out of memory``). A command catches only the kinds of its own work (a bad data row, a run of other
    settings)."""
    try:
        yield
    except BrokenPipeError as error:
        if not stdout_closed():  # another pipe (a worker process's) broke: an error of the work
            fail(os_error_text(error))
        raise  # the output's reader went away (`| head -1`): click exits 1 without a message, as it does outside
    except OSError as error:
        fail(os_error_text(error))
    except MemoryError as error:
        fail(str(error) or "out of memory (MemoryError)")


def stdout_closed() -> bool:
    """Whether standard output is a pipe or socket whose reading end is closed (``wherefrom scores ... | head -1``
    after ``head`` read its line): polled, so nothing is written. ``False`` where it cannot be polled (not a file
    descriptor, no ``poll`` on this OS)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))  # pipe | socket
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return False


def os_error_text(error: OSError) -> str:
    """``PATH: reason`` (``PATH -> OTHER: reason`` for a rename) for an error of the OS that names its file, in
    place of Python's ``[Errno 21] reason: 'PATH'``; any other ``OSError`` as it is."""
    if error.filename is None or not error.strerror:
        return str(error)
    paths = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    return f"{paths}: {error.strerror}"


def stdout_console() -> Console:
    """A rich console on stdout for ``query``'s and ``demo``'s tables: on a terminal as wide as it is, and as wide as
    ``COLUMNS`` says where that is set; else (a file or pipe) as wide as the rows need, where rich took 80 columns
    and folded cells, ids among them, over lines."""
    chosen = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(emoji=False, width=None if chosen else UNWRAPPED_WIDTH)


UNWRAPPED_WIDTH = 100_000
"""The width a table printed into a file or pipe may take (:func:`stdout_console`): more than any row needs."""


def say(line: str) -> None:
    """One progress line on stderr, printed as it is."""
    console.print(line, markup=False, highlight=False)


def merged_options(pairs: list[str] | None, method: str, flag: str = "--option") -> dict[str, Any]:
    """The options of one ``method`` from ``--option`` pairs (its own over the ``"*"`` ones; a pair for another
    method is refused: :func:`method_pairs`); ``method="*"``: a flag of one thing's fields, whose pairs take no
    ``method.`` prefix (kept in the key, so refused as a field). ``ValueError`` for a setting option
    (:data:`wherefrom.methods.registry.SETTING_NAMES`) whose flag the running command has off its default too
    (``--fisher empirical --option fisher=true``: the option won without a word)."""
    if method == "*":
        return options_for(parse_option_pairs(pairs, flag, namespaced=False), method)
    from wherefrom.methods.registry import SETTING_NAMES

    options = options_for(method_pairs(pairs, [method], flag), method)
    # --fisher empirical --option fisher=true; a flag off its default only (a replay gives every recorded setting),
    # and an option that sets the flag's setting only (lissa's seed and batch_size are its own)
    both = changed_settings([key for key in options if key in SETTING_NAMES])
    if both:
        pairs_shown = ", ".join(f"{flag} {key}={options[key]}" for key in both)
        raise ValueError(f"{shown_flags(both)} and {pairs_shown} set the same setting: give it once")
    return options


def method_pairs(pairs: list[str] | None, methods: Iterable[str], flag: str = "--option") -> dict[str, dict[str, Any]]:
    """``--option`` pairs parsed (:func:`wherefrom.core.option_pairs.parse_option_pairs`), a ``method.key`` pair of a
    method not among ``methods`` refused (:func:`wherefrom.core.option_pairs.check_methods_named`)."""
    options = parse_option_pairs(pairs, flag)
    check_methods_named(options, methods, flag)
    return options


def method_list(text: str | None, default: Iterable[str]) -> list[str]:
    """``--methods`` as a list, or ``default`` when not given."""
    return [m.strip() for m in text.split(",") if m.strip()] if text else list(default)


def required(value: Any, name: str) -> Any:
    """``value``, or exit 2 saying that the setting ``name`` (a parameter name) must be given."""
    if value is None:
        fail(f"{SETTINGS[name].flag} is required for this command")
    return value


# --- the record of an invocation ----------------------------------------------------------------
@dataclass
class Invocation:
    """The command running now and its arguments (after checks), in signature order; ``unrecorded``: the
    settings its record leaves out (see :func:`record_only_set`)."""

    name: str
    arguments: dict[str, Any]
    given: set[str] = field(default_factory=set)
    """The settings the user gave (:func:`given_settings`), at their default value or not."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Each setting's default in this command (``command(defaults=...)``, else the setting's)."""
    unrecorded: set[str] = field(default_factory=set)
    replaced: list[tuple[Path, str, Any, Any, tuple[bool, bool]]] = field(default_factory=list)
    """``(folder, key, the record there before or None, the record written, (folder made, config.json made))`` of
    each :func:`remember` of this command, so that a command ending in an error puts them back, and removes what
    its record alone made (:func:`restore_records`)."""

    def recorded(self) -> dict[str, Any]:
        """The arguments that go into the record (:func:`recorded_line`, :func:`remember`)."""
        return {name: value for name, value in self.arguments.items() if name not in self.unrecorded}

    def pairs(self) -> list[tuple[str | None, Any]]:
        """``(flag or None for a positional argument, value)`` in order, for :func:`command_line`."""
        return [
            (None if SETTINGS[name].argument else SETTINGS[name].flag, value) for name, value in self.recorded().items()
        ]


_CURRENT: contextvars.ContextVar[Invocation] = contextvars.ContextVar("wherefrom_invocation")


@contextlib.contextmanager
def group_session() -> Iterator[World]:
    """:func:`wherefrom.core.distributed.session` for the running command, whose processes must all have been
    started with its arguments but the ``per_process`` settings (``--device``, ``--threads``): another
    ``--shard-size`` on one rank is refused on every rank, by flag, before anything is written
    (:func:`wherefrom.core.distributed.refuse_other_arguments`; a path is compared resolved, so ``run`` and
    ``/abs/run`` agree)."""
    with session() as world:
        given = [(SETTINGS[name], value) for name, value in _CURRENT.get().arguments.items()]
        refuse_other_arguments(
            {s.flag: str(v.resolve()) if isinstance(v, Path) else v for s, v in given if not s.per_process}
        )
        yield world


def recorded_line() -> str:
    """The running command as one line that reruns it, its paths portable
    (:func:`wherefrom.core.commandline.command_line`)."""
    invocation = _CURRENT.get()
    return command_line(invocation.name, invocation.pairs())


def record_only_set(names: Iterable[str]) -> None:
    """Leave the running command's settings among ``names`` that the user did not set (:func:`set_settings`) out
    of its record (:func:`recorded_line`, :func:`remember`): a preset decides them (``bench --preset``,
    ``ablate``), so a default written there would read as a value the run used. A rerun of the record resolves them the same way:
    what it names is set again, what it leaves out is left to the preset again."""
    names = list(names)
    leave_unrecorded(set(names) - set(set_settings(names)))


def leave_unrecorded(names: Iterable[str]) -> None:
    """Leave the running command's settings among ``names`` out of its record (:func:`recorded_line`,
    :func:`remember`): ``analyze``'s ihvp settings in its other analyses, which it does not read (one given off
    its default is refused)."""
    invocation = _CURRENT.get()
    invocation.unrecorded |= {n for n in names if n in invocation.arguments}


GUESTS = {"bench": frozenset({"analyze"}), "groundtruth": frozenset({"evaluate"})}
"""Commands that write into another command's folder by design: ``analyze`` into its bench folder, ``evaluate``
(by default) into its ground truth. Any other command's folder is its own (:func:`refuse_foreign_folder`)."""

NESTED = {"ablate": frozenset({"analyze"})}
"""Commands that write by design into a folder another command made inside its own: ``analyze`` into an
ablation's benches (``ABLATE/runs/RUN``). Any other folder a command made inside its own
(:data:`wherefrom.studies.outputs.FOLDER_CHILDREN`) is that command's (:func:`refuse_foreign_folder`)."""


def refuse_foreign_folder(folder: Path, saved: dict[str, Any] | None = None) -> None:
    """``ValueError`` when ``folder`` is another command's output folder, which the running command would write
    into: it was made by a command (:func:`wherefrom.studies.outputs.folder_makers`: the commands its
    ``config.json``, or ``saved``, that file's content, records, else those whose files it holds, a fine-tuning's
    unfinished one included) that is neither the running one nor its host or guest (:data:`GUESTS`). Both
    commands' files and settings would mix in one folder (``attribute --out RUN`` replaced the run's settings in
    its ``config.json``; ``wherefrom report`` showed the later command only). Likewise when ``folder`` is one of
    the folders another command makes in its own, one or two levels up (:func:`wherefrom.studies.outputs.enclosing_output`),
    but where :data:`NESTED` allows it: ``finetune --out GROUNDTRUTH/model --overwrite`` replaced the ground truth's
    fine-tuning under its measured losses. The message names the folder and the command that made it (a guest only where no host is
    there). Also ``ValueError`` naming a ``config.json`` that is not a JSON object. Called while a command runs
    (it names the running command)."""
    this = _CURRENT.get().name
    sharing = {this, *GUESTS.get(this, ())} | {host for host, guests in GUESTS.items() if this in guests}
    foreign = [name for name in folder_makers(folder, saved) if name not in sharing]
    place = f"{folder} is an output folder of"
    enclosing = enclosing_output(folder) if not foreign else None
    if enclosing is not None:
        outer, makers = enclosing
        foreign = [name for name in makers if name not in sharing and this not in NESTED.get(name, ())]
        place = f"{folder} lies inside {outer}, an output folder of"
    if foreign:
        hosts = [name for name in foreign if not any(name in guests for guests in GUESTS.values())]
        shown = " and ".join(f"`wherefrom {name}`" for name in hosts or foreign)
        raise ValueError(
            f"{place} {shown}; `wherefrom {this}` would mix its files and settings with "
            f"those there: choose another folder for {this}'s output"
        )


def remember(folder: Path, key: str | None = None) -> None:
    """Record the running command in ``folder/config.json`` under ``replay[key]`` (default: the command's
    name), beside whatever else that file holds, so that ``wherefrom replay FOLDER`` reruns it: its arguments,
    its line, the directory it ran in (``cwd``, relative to ``folder``: relative paths among the arguments are
    relative to it, and a project moved whole keeps it), ``folder`` as seen from there (so that ``replay`` of a
    copied or moved folder writes there, not to the folder it was copied from) and its ``position``, the order the folder's commands
    first ran in (a command run again keeps its place; the file's keys are sorted). The file is
    updated under its own lock (:func:`wherefrom.core.store.update_json`): commands recording themselves in one
    folder at once (two ``evaluate`` runs of one ground truth) keep each other's records. A command that ends in
    an error (exit 2: refused, or failed) puts back the record it replaced, or removes its own, unless another
    command recorded itself there since (:func:`restore_records`); a command killed, interrupted or crashed
    (a traceback) midway keeps its record, which ``replay`` then resumes. Raises ``ValueError`` naming a
    ``config.json`` that is not a JSON object, and one naming the folder when it is another command's
    (:func:`refuse_foreign_folder`; nothing is written then), and one naming a ``config.json`` that is no wherefrom
    record: it records no command and nothing of wherefrom's is beside it (a model's folder: ``bench --out MODEL``
    added its record to the model's ``config.json`` and its files beside the weights)."""
    invocation = _CURRENT.get()
    name = key or invocation.name
    record = {
        "command": invocation.name,
        "arguments": {name: _jsonable(value) for name, value in invocation.recorded().items()},
        "line": recorded_line(),
        "cwd": os.path.relpath(Path.cwd(), Path(folder).resolve()),
        "folder": os.path.relpath(Path(folder).resolve(), Path.cwd()),
    }

    def change(saved: dict[str, Any]) -> None:
        if saved and "replay" not in saved and not folder_makers(folder, saved):
            raise ValueError(
                f"{Path(folder) / 'config.json'} was not written by wherefrom (it records no command; its keys begin "
                f"{sorted(saved)[:4]}): a model's or another program's folder? `wherefrom {invocation.name}` would "
                f"add its record to that file and its output beside it: choose another folder for its output"
            )
        refuse_foreign_folder(folder, saved)  # under the file's lock: a command recording itself meanwhile counts
        records = saved.setdefault("replay", {})
        earlier = records.get(name)
        first = earlier.get("position") if isinstance(earlier, dict) else None
        positions = [r["position"] for r in records.values() if isinstance(r, dict) and "position" in r]
        records[name] = {**record, "position": first if first is not None else max(positions, default=-1) + 1}
        invocation.replaced.append((Path(folder), name, earlier, records[name], made))

    made = (not Path(folder).exists(), not (Path(folder) / "config.json").exists())
    update_json(Path(folder) / "config.json", change)


def restore_records(invocation: Invocation) -> None:
    """Put back, in each folder the failed ``invocation`` recorded itself in (:func:`remember`), the record it
    replaced, or remove its own where there was none: a refused ``fit --with-index`` (an index of another
    ``--dtype``) or ``evaluate --option`` (a key no method has) no longer leaves ``replay`` a command that fails.
    A ``config.json`` the record made that now holds nothing goes too (with its lock file), and so does the folder
    the record made when nothing else is in it: a refused ``tune``/``evaluate`` leaves no output folder."""
    for folder, name, earlier, written, (folder_made, file_made) in reversed(invocation.replaced):

        def change(saved: dict[str, Any], name: str = name, earlier: Any = earlier, written: Any = written) -> bool:
            records = saved.get("replay")
            if not isinstance(records, dict) or records.get(name) != written:
                return False  # another command recorded itself here since: its record stays
            if earlier is None:
                records.pop(name)
            else:
                records[name] = earlier
            return True

        config = folder / "config.json"
        if not config.is_file():  # a folder deleted meanwhile is not made again
            continue
        update_json(config, change)
        if file_made and read_json_object(config) in ({}, {"replay": {}}):
            config.unlink()
            (folder / f".{config.name}.lock").unlink(missing_ok=True)
            if folder_made and not any(folder.iterdir()):
                folder.rmdir()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Torch's CPU threads set to ``threads`` (default :func:`wherefrom.cli.settings.default_threads`)
    for the block, restored after it (commands also run inside tests and ``replay``). More than the cores this
    process may use are cut to them, with a note (``--threads 99999`` was an out-of-memory error, or a failure to
    load a library, naming no flag)."""
    import torch

    before = torch.get_num_threads()
    chosen = threads or default_threads()
    cores = available_cores()
    if chosen > cores:
        say(f"--threads {chosen}: this process may use {cores} CPU cores; running {cores} threads")
        chosen = cores
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)


# --- settings as parameters ---------------------------------------------------------------------
def _parameter(setting: Setting) -> Any:
    names = [] if setting.argument else [setting.flag]
    maker = typer.Argument if setting.argument else typer.Option
    return maker(
        setting.default,
        *names,
        help=escape(setting.help),  # shown as written: `[/INST]` is text, not a rich closing tag
        rich_help_panel=setting.group,
        show_default=setting.default is not ...,
    )


def _coerce(setting: Setting, value: Any) -> Any:
    """A value in the parameter's type: a path read back from ``config.json`` (text) as a ``Path``, a
    repeatable option given no times (typer: an empty list) as ``None``, a list as a list."""
    if isinstance(value, str) and setting.is_path:
        return Path(value)
    if isinstance(value, list | tuple):
        return list(value) or None
    return value


def settings_as(cls: type[T], **overrides: Any) -> T:
    """The configuration dataclass ``cls`` (e.g. ``AttributionConfig``, ``BenchConfig``) filled from the
    running command's settings of the same names (``--no-eos`` as ``append_eos``); ``overrides`` give the fields
    whose command-line form differs (a path as text, a comma-separated list as a list)."""
    arguments = _CURRENT.get().arguments
    names = {f.name for f in fields(cls) if f.init}  # type: ignore[arg-type]
    taken = {k: v for k, v in arguments.items() if k in names and k not in overrides}
    for flag, name in NEGATED_FLAGS.items():
        if name in names and flag in arguments and name not in overrides:
            taken[name] = not arguments[flag]
    return cls(**taken, **overrides)


def changed_settings(names: Iterable[str]) -> dict[str, Any]:
    """``{name: value}`` of the running command's settings among ``names`` whose value is not their
    default: those that change what the command computes (a flag given at its default value changes nothing,
    and a record of a command without a preset names every setting at its value)."""
    invocation = _CURRENT.get()
    arguments, defaults = invocation.arguments, invocation.defaults
    return {n: arguments[n] for n in names if n in arguments and arguments[n] != defaults[n]}


def set_settings(names: Iterable[str]) -> dict[str, Any]:
    """``{name: value}`` of the running command's settings among ``names`` that the user set: given
    (:func:`given_settings`; a flag at its default value too, such as ``--fisher true``) or off their default.
    A preset does not override them (``bench --preset``, ``ablate``)."""
    invocation = _CURRENT.get()
    changed = changed_settings(names)
    return {
        n: invocation.arguments[n]
        for n in names
        if n in invocation.arguments and (n in changed or n in invocation.given)
    }


def given_settings(context: typer.Context | None, given: Mapping[str, Any]) -> set[str]:
    """The settings among ``given`` (the keywords a command was called with) that the user gave: on the command
    line (``context``, the command's), those whose value did not come from the flag's default (click's parameter
    source); called as a function (no ``context``: ``replay`` passes a record's arguments), every keyword."""
    if context is None:
        return set(given)
    sources = {n: context.get_parameter_source(n) for n in given}
    return {n for n, source in sources.items() if source is not None and source.name != "DEFAULT"}


def shown_flags(given: dict[str, Any]) -> str:
    """Settings ``{name: value}`` as the command line gives them (:meth:`wherefrom.cli.settings.Setting.given`),
    apart by commas: ``--shard-size 2, --dtype float16``."""
    return ", ".join(SETTINGS[name].given(value) for name, value in given.items())


def refuse_unread_settings(
    *methods: str,
    kind: str = "method",
    names: Iterable[str] | None = None,
    preset: bool = False,
    options: Mapping[str, dict[str, Any]] | None = None,
) -> None:
    """``ValueError`` when the running command was given, off its default, an attribution setting that none of
    ``methods`` reads (:attr:`wherefrom.methods.registry.MethodSpec.settings_read`: ``--damping`` for ``bm25``,
    ``--strategy`` for ``logra``), or a ``--strategy`` other than the one a method fixes: recorded with the run or
    the scores it would change no number, and a later run without it would be refused as other settings. The
    message names each flag and value, and the method as a ``kind`` (``fit --strategy`` names a strategy).
    ``methods``: a command's one method (``fit``, ``attribute``) or a study's list (``bench``, ``ablate``,
    ``evaluate``: ``evaluate --methods bm25 --damping 0.5`` was recorded). ``names``: the settings checked (default
    every :class:`wherefrom.engine.api.AttributionConfig` field; a study passes those its fine-tuning does not read
    too). ``preset``: a flag given at its default value counts too, as it overrides the preset (:func:`set_settings`:
    ``bench --preset``, ``ablate``). ``options``: the ``--option`` pairs as :func:`method_pairs` gives them; a
    method's own options may make a setting unread (``--fisher`` for ``logra`` with ``--option curvature=false``),
    and an own option they make unread is refused too (:func:`wherefrom.methods.registry.refuse_skipped_options`), as
    is a method's own ``damping_factor`` option beside ``--damping`` or its own ``damping`` option (userO: taken,
    recorded and unused; a method's own ``damping`` makes ``--damping-factor`` unread for it)."""
    from wherefrom.curvature.base import DAMPING_FACTOR, unused_damping_factor
    from wherefrom.engine.api import AttributionConfig
    from wherefrom.methods.registry import method_spec, refuse_skipped_options, split_settings

    specs = {method: method_spec(method) for method in methods}
    chosen = list(names) if names is not None else [f.name for f in fields(AttributionConfig)]
    flags = [FLAG_OF_FIELD.get(name, name) for name in chosen]  # --no-eos for append_eos
    given = set_settings(flags) if preset else changed_settings(flags)
    for method, spec in specs.items():
        fixed = spec.settings.get("strategy")
        if fixed is not None and given.get("strategy", fixed) != fixed:
            raise ValueError(
                f"--strategy {given['strategy']}: {kind} {method!r} is influence with the {fixed!r} strategy; leave "
                f"--strategy out, or give --method {given['strategy']}"
            )
    fields_given = {n: (NEGATED_FLAGS[n], not given[n]) if n in NEGATED_FLAGS else (n, given[n]) for n in given}
    own = {method: options_for(options or {}, method) for method in methods}
    for method in methods:
        mine, constructor = split_settings(own[method])  # its setting options (over the flags) and the others
        refuse_skipped_options(method, mine, constructor)
        damping = mine.get("damping", given.get("damping"))
        unused = unused_damping_factor(damping, mine.get("damping_factor", DAMPING_FACTOR))
        if unused:  # userO: refused as two flags or two options, taken as --damping and an option's factor
            raise ValueError(f"{kind} {method!r}: option {unused} (--damping or its own --option damping=...)")
    unread = [n for n, (name, v) in fields_given.items() if not any(s.takes(name, v, own[m]) for m, s in specs.items())]
    if unread:
        shown = shown_flags({n: given[n] for n in unread})
        one = len(methods) == 1
        hint = "".join(
            f"; {method}'s own {n} is --option {'' if one else method + '.'}{n}=..."
            for n in unread
            for method, spec in specs.items()
            if n in {option.name for option in spec.options} - spec.unread_with(own[method])
        )
        who = f"{kind} {methods[0]!r} does not read" if one else f"none of the methods {', '.join(methods)} reads"
        raise ValueError(
            f"{who} {shown}: leave {'it' if len(unread) == 1 else 'them'} out (a setting a method does not read "
            f"changes no score, yet it is recorded, and a later run without it would be refused){hint}"
        )


def reflowed(docstring: str) -> str:
    """``docstring`` with each paragraph on one line (paragraphs apart by a blank line), so that ``--help``
    wraps it to the terminal's width instead of breaking it where the source line ended."""
    paragraphs = inspect.cleandoc(docstring).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


DISTRIBUTED: set[str] = set()
"""The commands that run under ``torchrun`` (registered with ``distributed=True``); any other is refused there."""


INTERRUPTED = (
    "the work already written is kept (a long job writes it as it goes, as after kill -9), and the same command run "
    "again goes on from it; a command that writes only at its end (attribute, query, diagnose) starts again"
)
"""What a command interrupted by Ctrl-C (``KeyboardInterrupt``) prints after ``interrupted:``."""
INTERRUPTED_EXIT = 130
"""Its exit status: 128 + SIGINT, as a shell reports a command ended by Ctrl-C."""


def command(
    function: Callable[..., None] | None = None,
    *,
    uses: Iterable[str] = (),
    name: str | None = None,
    distributed: bool = False,
    files: Mapping[str, Check] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Any:
    """Register a function as the command of its name (or ``name``, e.g. ``word-order``). Its parameters, and the names in ``uses``
    (received through ``**settings`` and read by :func:`settings_as`), name settings of
    :data:`wherefrom.cli.settings.SETTINGS`; each gets that setting's flag, type, default and help.

    Before the function runs, every argument is checked (all problems are printed, exit 2, nothing
    written), torch's CPU threads are set from ``--threads``, and the invocation is made available
    to :func:`remember`, :func:`recorded_line` and :func:`settings_as`. The registered callable also
    takes its parameters as keywords (missing ones take their defaults), which is how ``replay``
    reruns a record.

    ``distributed``: the command runs under ``torchrun`` (its processes share the work); any other command is
    refused there before it runs (:class:`wherefrom.core.distributed.NotDistributable`, exit 2), where each
    process would have repeated the whole job and printed or written its results.

    ``files``: settings declared as folders that name a file in this command, with the check that replaces the
    folder's (:func:`wherefrom.cli.settings.check_arguments`): ``report --out`` the HTML file
    (:func:`wherefrom.cli.settings.output_file`), ``evaluate --out`` a file stem
    (:func:`wherefrom.cli.settings.output_stem`).

    ``defaults``: this command's own defaults of settings shared with other commands, shown in its help and
    taken where the flag is not given (``word-order``'s fine-tuning is the study's, not ``finetune``'s).
    """
    if function is None:
        return functools.partial(
            command, uses=tuple(uses), name=name, distributed=distributed, files=files, defaults=defaults
        )
    name = name or function.__name__
    if distributed:
        DISTRIBUTED.add(name)
    own = [p.name for p in inspect.signature(function).parameters.values() if p.kind is not p.VAR_KEYWORD]
    names = own + [u for u in uses if u not in own]
    unknown = [p for p in names if p not in SETTINGS]
    if unknown:
        raise TypeError(f"command {name}: parameters {unknown} are not settings in wherefrom.cli.settings")
    defaults = dict(defaults or {})
    if set(defaults) - set(names):
        raise TypeError(f"command {name}: defaults for {sorted(set(defaults) - set(names))}, which it does not take")
    settings = [replace(SETTINGS[p], default=defaults[p]) if p in defaults else SETTINGS[p] for p in names]

    @functools.wraps(function)
    def run(typer_context: typer.Context | None = None, **given: Any) -> None:
        unknown = sorted(set(given) - set(names))
        if unknown:
            fail(f"command {name} has no settings {unknown}")
        arguments = {}
        for setting in settings:
            value = given.get(setting.name, setting.default)
            if isinstance(value, typer.models.ParameterInfo):
                value = value.default
            if value is ...:
                fail(f"{setting.flag} is required")
            arguments[setting.name] = _coerce(setting, value)
        problems = check_arguments(arguments, files)
        if problems:
            fail("\n".join(problems))
        if not distributed:
            try:
                refuse(f"command {name}", f"run it in one process; {', '.join(sorted(DISTRIBUTED))} run under torchrun")
            except (NotDistributable, ValueError) as error:  # ValueError: a malformed RANK/WORLD_SIZE environment
                fail(error)
        invocation = Invocation(
            name, arguments, given_settings(typer_context, given), {s.name: s.default for s in settings}
        )
        token = _CURRENT.set(invocation)
        try:
            with torch_threads(arguments.get("threads")), system_errors_named(), warnings_above_bars():
                function(**arguments)
        except typer.Exit as done:
            # an error (exit 2) did not make the folder; exit 1 (finished, some method failed) did, and a crash
            # (a traceback) or an interrupt, like kill -9, keeps the record for replay to resume
            if done.exit_code == 2:
                restore_records(invocation)
            end_process(done.exit_code)  # a torchrun rank ends here (returns in one process)
            raise
        except PeersLost as lost:  # one line, not gloo's traceback; exit 1 keeps the record, as a crash does
            console.print("[bold red]error:[/]", escape(str(lost)))
            end_process(1)
            raise typer.Exit(code=1) from None
        except KeyboardInterrupt:  # userK: click's bare "Aborted!" (exit 1) said nothing of the work kept
            console.print("[bold red]interrupted:[/]", escape(INTERRUPTED))
            end_process(INTERRUPTED_EXIT)
            raise typer.Exit(code=INTERRUPTED_EXIT) from None
        finally:
            _CURRENT.reset(token)
        end_process(0)

    context = inspect.Parameter("typer_context", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=typer.Context)
    parameters = [context] + [
        inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=_parameter(s), annotation=s.type)
        for s in settings
    ]
    del run.__wrapped__
    run.__doc__ = reflowed(function.__doc__ or "")
    run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {"typer_context": typer.Context} | {s.name: s.type for s in settings}
    COMMANDS[name] = run
    app.command(name=name, help=escape(run.__doc__))(run)
    return run
