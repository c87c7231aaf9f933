"""Typed option declarations (:class:`OptionSpec`) and the one validator every named component uses.

A curvature strategy (:data:`wherefrom.curvature.STRATEGIES`) and a method
(:data:`wherefrom.methods.registry.METHODS`) each declare their keyword options as a tuple of
:class:`OptionSpec`: name, type, default, allowed range or choices, help and the paper it comes from.
:func:`check_options` validates a ``{name: value}`` dict against such a tuple before any model work
and raises :class:`OptionError` (a ``ValueError``) naming the owner (e.g. ``method 'lissa'``), the
option, the value given and what is allowed.

Values that arrive as text (the command line's ``--option key=value`` keeps a value that is not
JSON as a string) are read as JSON for number, boolean and list options: ``"300"`` becomes ``300``
for an ``int`` option and ``"abc"`` is an error. An ``int`` given to a ``float`` option becomes a
float; a ``bool`` is never taken for a number, nor a float for an ``int``.

Type and default are usually read from the signature that consumes the option
(:func:`from_signature`), so the default lives in one place, the constructor; the spec adds help,
range and source.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import math
import numbers
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

__all__ = [
    "INT64_LARGEST",
    "UNSET",
    "OptionError",
    "OptionSpec",
    "check_options",
    "from_signature",
    "int64_problem",
    "with_defaults",
]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Marks a type or default not given yet (filled by :func:`from_signature`)."""

INT64_LARGEST = 2**63 - 1
"""The largest integer a setting or option takes (counts, sizes and seeds go into tensors, arrays and files as int64;
``--shard-size 99999999999999999999`` was stored, then a tensor of that size overflowed with a traceback)."""


def plain_numbers(config: Any, kinds: Mapping[str, type], optional: Collection[str] = ()) -> None:
    """Check each numeric setting ``name`` of ``config`` (a dataclass) is of ``kinds[name]`` (``numbers.Integral``
    or ``numbers.Real``; a bool is neither; ``None`` allowed for ``optional``) and store numpy's numbers as Python's
    (kept as they were, they failed later checks and JSON: a fine-tuning died writing its record after its first
    epoch). Raises ``ValueError`` naming the setting and value."""
    for name, kind in kinds.items():
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            kind_name = "an integer" if kind is numbers.Integral else "a number"
            raise ValueError(f"{name} must be {kind_name}{' or None' if name in optional else ''}, got {value!r}")
        if not isinstance(value, (int, float)):
            setattr(config, name, int(value) if kind is numbers.Integral else float(value))


def int64_problem(value: Any) -> str | None:
    """What is wrong with an integer ``value`` outside the 64-bit integers ``[-2^63, 2^63 - 1]``, else ``None``."""
    if type(value) is int and not -INT64_LARGEST - 1 <= value <= INT64_LARGEST:
        return f"{value} is outside the 64-bit integers [-2^63, 2^63 - 1]"
    return None


class OptionError(ValueError):
    """An option that its owner does not have, or a value of the wrong type or out of its range."""


@dataclass(frozen=True)
class OptionSpec:
    """One keyword option of a strategy or method.

    ``type``: ``int``, ``float``, ``bool``, ``str``, ``list`` (a list or tuple), ``callable`` (any
    callable), ``object`` (anything), a class (``isinstance``) or a tuple of these (any one of them: tracin's
    ``base``, a folder or a loader, was ``object``, and ``base=5`` ended in a traceback). ``low``/``high``: inclusive bounds for
    numbers (``low_inclusive=False`` makes ``low`` exclusive; a ``float`` is finite: ``inf`` met every lower bound,
    and NaN every option without one: lissa's ``safety=inf`` divided by zero, cg's ``tol=inf`` stopped at once with
    no warning, bm25's ``k1=inf`` scored NaN); ``choices``: the allowed values;
    ``nullable``: ``None`` is allowed; ``required``: the option must be given (it has no default).
    ``source``: the paper (and equation) the option's meaning comes from, if any. ``problem``: what is wrong with
    a value of the right type, or ``None`` (tracin's ``device``: one that this machine has).
    """

    name: str
    type: Any = UNSET
    default: Any = UNSET
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    choices: tuple | None = None
    nullable: bool = False
    required: bool = False
    source: str = ""
    problem: Callable[[Any], str | None] | None = None

    def allowed(self) -> str:
        """What the option accepts, in words (used by error messages and ``wherefrom methods``)."""
        if isinstance(self.type, tuple):
            words = [replace(self, type=kind, nullable=False).allowed() for kind in self.type]
            return " or ".join(words) + (" or null" if self.nullable else "")
        if self.choices is not None:
            text = "one of " + ", ".join(json.dumps(c) for c in self.choices)
        elif self.type is bool:
            text = "true or false"
        elif self.type in (int, float):
            text = "an integer" if self.type is int else "a finite number"
            low, high = (
                None if b is None else str(int(b)) if self.type is int else f"{b:g}" for b in (self.low, self.high)
            )
            if low is not None and high is not None:
                text += f" in {'[' if self.low_inclusive else '('}{low}, {high}]"
            elif low is not None:
                text += f" {'>=' if self.low_inclusive else '>'} {low}"
            elif high is not None:
                text += f" <= {high}"
        elif self.type is str:
            text = "a string"
        elif self.type is list:
            text = "a list (JSON on the command line)"
        elif self.type is callable:
            text = "a callable (Python only)"
        elif self.type is object:
            text = "any value"
        else:
            text = f"a {self.type.__name__} (Python only)"
        return text + (" or null" if self.nullable else "")

    def check(self, value: Any, owner: str) -> Any:
        """``value`` converted to this option's type; :class:`OptionError` when it is not allowed."""
        if value is None and self.nullable:
            return None
        converted = self._convert(value)
        if converted is None:  # "null" text for a nullable option
            return None
        if problem := int64_problem(converted):
            raise OptionError(f"{owner}: option {self.name!r} got {value!r}: {problem}")
        if converted is UNSET or not self._in_range(converted):
            raise OptionError(f"{owner}: option {self.name!r} got {value!r}; allowed: {self.allowed()}")
        if self.problem is not None and (problem := self.problem(converted)):
            raise OptionError(f"{owner}: option {self.name!r} got {value!r}: {problem}")
        return converted

    def _convert(self, value: Any) -> Any:
        """``value`` as this type (text read as JSON where that helps), or :data:`UNSET`."""
        if isinstance(self.type, tuple):  # the first of the types that takes it
            converted = (replace(self, type=kind)._convert(value) for kind in self.type)
            return next((c for c in converted if c is not UNSET), UNSET)
        if isinstance(value, str) and self.type in (int, float, bool, list):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return UNSET
            if value is None:
                return None if self.nullable else UNSET
        if self.type is int:
            return value if isinstance(value, int) and not isinstance(value, bool) else UNSET
        if self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            try:
                return float(value) if ok else UNSET
            except OverflowError:  # an integer literal beyond a float's range (it ended in a traceback)
                return UNSET
        if self.type is list:
            return value if isinstance(value, (list, tuple)) else UNSET
        if self.type is str and isinstance(value, (bool, int, float)):
            # `key=true` on the command line is read as JSON: the text typed (fisher=true is "true")
            return json.dumps(value)
        if self.type is callable:
            return value if callable(value) else UNSET
        if self.type is object:
            return value
        return value if isinstance(value, self.type) else UNSET

    def _in_range(self, value: Any) -> bool:
        if self.choices is not None and value not in self.choices:
            return False
        if self.type in (int, float):
            if not math.isfinite(value):
                return False
            if self.low is not None and not (value >= self.low if self.low_inclusive else value > self.low):
                return False
            if self.high is not None and not value <= self.high:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description: name, type, default, allowed, help, source, required, ..."""
        default = self.default
        if not (default is None or isinstance(default, (bool, int, float, str, list, tuple))):
            default = str(default)
        return {
            "name": self.name,
            "type": _type_name(self.type),
            "default": None if self.required else default,
            "required": self.required,
            "allowed": self.allowed(),
            "choices": None if self.choices is None else list(self.choices),
            "low": self.low,
            "high": self.high,
            "nullable": self.nullable,
            "help": self.help,
            "source": self.source,
        }


def _type_name(kind: Any) -> str:
    if isinstance(kind, tuple):
        return " | ".join(_type_name(k) for k in kind)
    if kind is callable:
        return "callable"
    return getattr(kind, "__name__", str(kind))


def check_options(
    owner: str, specs: Iterable[OptionSpec], given: Mapping[str, Any], supplied: Collection[str] = ()
) -> dict[str, Any]:
    """``given`` validated against ``specs`` and converted to their types (same keys, same order).

    ``owner`` names who the options belong to in messages, e.g. ``"method 'lissa'"``. ``supplied``: required
    options the caller fills in later (a study's fine-tuning checkpoints), not missing now. Raises
    :class:`OptionError` for an option not in ``specs`` (listing those that are), a required option
    missing, or a value of the wrong type or out of range (naming the option, the value and what is
    allowed).
    """
    by_name = {spec.name: spec for spec in specs}
    unknown = sorted(set(given) - set(by_name))
    if unknown:
        raise OptionError(
            f"{owner} has no option(s) {unknown} (given { ({k: given[k] for k in unknown}) }); "
            f"its options are {list(by_name)}"
        )
    missing = [spec for spec in by_name.values() if spec.required and spec.name not in (*given, *supplied)]
    if missing:
        spec = missing[0]
        raise OptionError(f"{owner} needs option {spec.name!r} ({spec.allowed()}): {spec.help}")
    return {name: by_name[name].check(value, owner) for name, value in given.items()}


def with_defaults(specs: Iterable[OptionSpec], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with every option of ``specs`` it leaves out at its default (a required option, which has
    none, stays out): the options a component runs with, in one form whether a default was given or left out.
    Settings are recorded and compared in this form. Nothing is validated (:func:`check_options` does that)."""
    chosen = dict(given)
    return {
        **{s.name: s.default for s in specs if s.name not in chosen and not s.required and s.default is not UNSET},
        **chosen,
    }


def from_signature(function: Callable, *specs: OptionSpec) -> tuple[OptionSpec, ...]:
    """``specs`` with their unset ``type``, ``default``, ``choices`` and ``nullable`` read from the
    parameter of the same name of ``function`` (a function, or a class: its ``__init__``).

    A ``Literal[...]`` annotation gives the choices, ``X | None`` makes the option nullable, a
    parameter without a default makes it required. ``TypeError`` (at import time) when ``function``
    has no such parameter or no annotation to read a type from.
    """
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function.__init__ if isinstance(function, type) else function)
    out = []
    for spec in specs:
        if spec.name not in signature.parameters:
            raise TypeError(f"{function.__qualname__} has no parameter {spec.name!r}")
        parameter = signature.parameters[spec.name]
        changes: dict[str, Any] = {}
        if spec.default is UNSET:
            if parameter.default is inspect.Parameter.empty:
                changes.update(default=None, required=True)
            else:
                changes["default"] = parameter.default
        if spec.type is UNSET:
            if spec.name not in hints:
                raise TypeError(f"{function.__qualname__}: parameter {spec.name!r} has no annotation; give a type")
            kind, choices, nullable = _read_annotation(hints[spec.name])
            changes["type"] = kind
            changes["nullable"] = spec.nullable or nullable
            if spec.choices is None and choices is not None:
                changes["choices"] = choices
        out.append(replace(spec, **changes))
    return tuple(out)


def _read_annotation(hint: Any) -> tuple[Any, tuple | None, bool]:
    """``(type, choices, nullable)`` of a parameter annotation (see :class:`OptionSpec` for types)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        nullable = len(members) < len(typing.get_args(hint))
        if len(members) == 1:
            kind, choices, _ = _read_annotation(members[0])
            return kind, choices, nullable
        return object, None, nullable
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices, False
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        return list, None, False
    if origin is collections.abc.Callable:
        return callable, None, False
    if hint is Any:
        return object, None, False
    return hint, None, False
