"""Tasks the project generates itself (no data files, no downloads).

:func:`rule_identification` builds a class-attribution task in the style of the "grammars" set of
Li et al. (2024): each example shows a short sentence and a rewritten copy of it, and the model
must name the rewriting rule. The rule's name is both the completion and the class ``label``, so
attribution quality can be measured as "do the top-scored training rows share the query's rule?".

Example (the first training row for ``seed=0``)::

    prompt:     "Determine the rewriting rule: leaf sky hill soft -> soft hill sky leaf\\nRule:"
    completion: " reverse"
    label:      "reverse"

:func:`write_jsonl` writes records so that :func:`wherefrom.core.data.load_records` reads them back.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from wherefrom.core.data import Record
from wherefrom.core.store import atomic_write_text

__all__ = [
    "PROMPT_TEMPLATE",
    "RULES",
    "WORDS",
    "rule_identification",
    "write_jsonl",
]

WORDS: tuple[str, ...] = (
    "apple",
    "bird",
    "blue",
    "boat",
    "book",
    "bread",
    "cat",
    "chair",
    "cold",
    "cup",
    "dark",
    "dog",
    "door",
    "eats",
    "fast",
    "fish",
    "green",
    "hat",
    "hill",
    "house",
    "jumps",
    "lamp",
    "leaf",
    "milk",
    "moon",
    "old",
    "paper",
    "park",
    "pen",
    "quiet",
    "rain",
    "red",
    "reads",
    "river",
    "road",
    "runs",
    "salt",
    "sees",
    "sings",
    "sky",
    "slow",
    "small",
    "snow",
    "soft",
    "star",
    "stone",
    "sun",
    "table",
    "tall",
    "tree",
    "walks",
    "warm",
    "water",
    "wind",
    "wall",
    "wood",
    "gold",
    "young",
    "big",
    "car",
)
"""The built-in vocabulary: 60 distinct common lowercase English words of at most 5 letters.

Short words keep every example (prompt + completion + EOS) within 118 characters, so the task
fits the 128 positions of the character-level tiny models in :mod:`wherefrom.models.tiny`."""


def _reverse(words: list[str]) -> list[str]:
    return words[::-1]


def _swap_ends(words: list[str]) -> list[str]:
    return [words[-1], *words[1:-1], words[0]]


def _repeat_first(words: list[str]) -> list[str]:
    return [words[0], *words]


def _drop_last(words: list[str]) -> list[str]:
    return words[:-1]


def _sort(words: list[str]) -> list[str]:
    return sorted(words)


RULES: dict[str, Callable[[list[str]], list[str]]] = {
    "reverse": _reverse,
    "swap ends": _swap_ends,
    "repeat first": _repeat_first,
    "drop last": _drop_last,
    "sort": _sort,
}
"""Rule name -> rewrite (a function of the list of words). The name is the completion and label."""

PROMPT_TEMPLATE = "Determine the rewriting rule: {sentence} -> {rewritten}\nRule:"
"""The prompt; the completion is ``" " + rule name``."""

_MIN_WORDS, _MAX_WORDS = 3, 5
_MAX_TRIES = 10_000


def _sample_example(rng: random.Random, rule: str, rule_names: Sequence[str], used: set[str]) -> tuple[str, str]:
    """Draw a fresh sentence whose rewrite under ``rule`` identifies ``rule`` unambiguously.

    The sentence has 3-5 distinct words and is not in ``used``; its rewrite differs from the
    sentence and from the rewrite under every other rule in ``rule_names`` (so, e.g., a 3-word
    sentence is never used for "reverse" when "swap ends" is a rule, since both give the same
    output). The sentence is added to ``used``.
    """
    for _ in range(_MAX_TRIES):
        words = rng.sample(WORDS, rng.randint(_MIN_WORDS, _MAX_WORDS))
        sentence = " ".join(words)
        if sentence in used:
            continue
        rewritten = RULES[rule](words)
        if rewritten == words:
            continue
        if any(RULES[other](words) == rewritten for other in rule_names if other != rule):
            continue
        used.add(sentence)
        return sentence, " ".join(rewritten)
    raise RuntimeError(f"could not draw a new unambiguous sentence for rule {rule!r}")


def _make_split(
    prefix: str,
    n: int,
    rng: random.Random,
    rule_names: Sequence[str],
    used: set[str],
) -> list[Record]:
    labels = [rule_names[i % len(rule_names)] for i in range(n)]  # round-robin: balanced
    rng.shuffle(labels)
    width = max(4, len(str(max(n - 1, 0))))
    records = []
    for index, rule in enumerate(labels):
        sentence, rewritten = _sample_example(rng, rule, rule_names, used)
        records.append(
            Record(
                id=f"{prefix}-{index:0{width}d}",
                prompt=PROMPT_TEMPLATE.format(sentence=sentence, rewritten=rewritten),
                completion=f" {rule}",
                label=rule,
            )
        )
    return records


def rule_identification(
    n_train: int = 240,
    n_test: int = 40,
    seed: int = 0,
    rules: Sequence[str] | None = None,
) -> tuple[list[Record], list[Record]]:
    """A balanced "which rewriting rule was applied?" task: ``(train, test)`` records.

    Each record's prompt is ``"Determine the rewriting rule: <sentence> -> <rewritten>\\nRule:"``,
    its completion ``" <rule>"`` (leading space) and its label ``"<rule>"``. Sentences are 3-5
    distinct words from :data:`WORDS`; ``rules`` (default: all of :data:`RULES`, in that order)
    picks which rewrites are used. Every rewrite changes the sentence and differs from what any
    other selected rule would give, so each example's rule is identifiable.

    Classes are balanced (labels assigned round-robin over ``rules``, so counts differ by at most
    one, then shuffled). Output is a deterministic function of the arguments; no sentence appears
    twice, so train and test sentences are disjoint. Ids are ``train-0000``... and ``test-0000``...
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    rule_names = list(RULES) if rules is None else list(rules)
    if not rule_names:
        raise ValueError("rules must name at least one rule")
    unknown = [name for name in rule_names if name not in RULES]
    if unknown:
        raise ValueError(f"unknown rule(s) {unknown}; choose from {list(RULES)}")
    if len(set(rule_names)) != len(rule_names):
        raise ValueError(f"rules must not repeat, got {rule_names}")

    rng = random.Random(seed)
    used: set[str] = set()
    train = _make_split("train", n_train, rng, rule_names, used)
    test = _make_split("test", n_test, rng, rule_names, used)
    return train, test


def write_jsonl(records: Sequence[Record], path: str | Path) -> Path:
    """Write ``records`` as JSONL rows ``{id, prompt, completion, label}``, atomically.

    The file is written to a temporary name in the same folder and renamed into place, so an
    interrupted write never leaves a partial file. Parent folders are created. Returns the path.
    """
    path = Path(path)
    rows = ({"id": r.id, "prompt": r.prompt, "completion": r.completion, "label": r.label} for r in records)
    atomic_write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), path)
    return path
