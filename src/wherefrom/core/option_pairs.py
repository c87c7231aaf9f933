"""Method options given as text: ``method.key=value`` pairs parsed once, merged per method once.

A pair ``key=value`` applies to every method (it is stored under the method name ``"*"``);
``method.key=value`` to that method alone, and wins over the ``"*"`` entry of the same key.
Values are parsed as JSON when they parse (``300``, ``0.1``, ``null``, ``"mean"``, ``["a"]``),
and kept as text otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

__all__ = [
    "OptionPairError",
    "check_methods_named",
    "format_option_pairs",
    "options_for",
    "parse_option_pairs",
    "parse_value",
]


class OptionPairError(ValueError):
    """A bad pair: the message names the flag and the pair, ``problem`` says what is wrong with it."""

    def __init__(self, flag: str, pair: str, problem: str):
        super().__init__(f"{flag} {pair!r}: {problem}")
        self.problem = problem


def parse_value(text: str) -> Any:
    """``text`` as JSON when it parses, else ``text`` itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_option_pairs(
    pairs: Iterable[str] | None, flag: str = "--option", namespaced: bool = True
) -> dict[str, dict[str, Any]]:
    """``["lissa.depth=300", "seed=1"]`` -> ``{"lissa": {"depth": 300}, "*": {"seed": 1}}``.

    For a flag that is not ``namespaced`` (its options are one thing's fields) a ``method.`` prefix stays part of
    the key, all under ``"*"``, so the field check refuses it as unknown rather than it being dropped. Raises
    :class:`OptionPairError` naming ``flag`` and the pair when a pair has no ``=`` or no key, or repeats a key
    (which value was meant is not known).
    """
    parsed: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        method, _, name = key.rpartition(".") if namespaced else ("", "", key)
        if not sep or not name:
            expected = "key=value or method.key=value" if namespaced else "key=value"
            raise OptionPairError(flag, pair, f"expected {expected}")
        entries = parsed.setdefault(method or "*", {})
        if name in entries:
            raise OptionPairError(flag, pair, f"{key} is given twice ({key}={json.dumps(entries[name])} before)")
        entries[name] = parse_value(raw)
    return parsed


def options_for(options: dict[str, dict[str, Any]], method: str) -> dict[str, Any]:
    """The options of ``method``: the ``"*"`` entries overridden by the method's own."""
    return {**options.get("*", {}), **options.get(method, {})}


def format_option_pairs(options: dict[str, dict[str, Any]]) -> list[str]:
    """Inverse of :func:`parse_option_pairs`: ``{"lissa": {"depth": 300}}`` -> ``["lissa.depth=300"]``
    (sorted by method, then key; values as JSON)."""
    return [
        f"{key if method == '*' else f'{method}.{key}'}={json.dumps(value)}"
        for method, entries in sorted(options.items())
        for key, value in sorted(entries.items())
    ]


def check_methods_named(options: dict[str, dict[str, Any]], methods: Iterable[str], flag: str = "--option") -> None:
    """Raise :class:`OptionPairError` naming ``flag`` and the first ``method.key=value`` pair of ``options``
    (:func:`parse_option_pairs`) whose method is not among the ``methods`` that run: it would be silently unused
    (e.g. ``--option lissa.depth=5`` beside ``--methods ekfac,gradsim``). Pairs without a method apply to all;
    one whose key every method that runs sets itself (``depth=5`` beside ``lissa.depth=6`` where only lissa runs)
    is never used either, and is refused naming both pairs."""
    running = list(methods)
    for method in sorted(set(options) - {"*", *running}):
        pair = format_option_pairs({method: options[method]})[0]
        raise OptionPairError(flag, pair, f"method {method!r} does not run here (methods run: {', '.join(running)})")
    for key, value in sorted(options.get("*", {}).items()):
        if running and all(key in options.get(method, {}) for method in running):
            own = ", ".join(
                format_option_pairs({method: {key: options[method][key]}})[0] for method in dict.fromkeys(running)
            )
            raise OptionPairError(
                flag,
                f"{key}={json.dumps(value)}",
                f"every method that runs sets {key} itself ({own}), so this value is never used; give one of them",
            )
