"""Benchmark tasks: a data set plus the attribution question it asks.

Every task is a :class:`BenchTask` with ``train`` and ``test`` records and a ``kind``:

* ``"class"``: class attribution. Each record's ``label`` is its class; a good attribution puts
  training rows of the query's class on top. ``targets`` is empty.
* ``"identify"``: find specific training rows. ``targets`` maps each test id to the train ids that
  should be found (for example the rows that carry the same backdoor trigger).

Tasks the project generates itself (deterministic for a seed, no files, no downloads):

* :func:`math_templates` ("math backtracking"): which of 10 arithmetic word-problem templates a test
  problem came from.
* :func:`rule_rewriting`: which string-rewriting rule was applied
  (wraps :func:`wherefrom.studies.generated.rule_identification`).
* :func:`backdoor`: a harmless backdoor: a rare trigger phrase in a few training prompts switches
  the completion to a distinctive sentence; test prompts carry a trigger; the rows to find are the
  training rows with the same trigger.
* :func:`unwanted_behaviour`: the "harmful data" task made harmless: most rows that ask for an
  invented secret (a person's vault code) refuse, a small share comply; test prompts ask for that
  secret and comply; the rows to find are the complying training rows.

:func:`from_path` loads a class task from files (e.g. ``shared/datasets/emotion.train.jsonl``).
:data:`TASKS` names the generated tasks.

Ids are ``train-0000``... and ``test-0000``...; no prompt appears twice within or across splits.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

from wherefrom.core.data import DataError, Record, check_records, load_records
from wherefrom.studies.generated import rule_identification

__all__ = [
    "MATH_TEMPLATES",
    "REFUSAL",
    "TASKS",
    "TRIGGERS",
    "BenchTask",
    "MathTemplate",
    "backdoor",
    "from_path",
    "math_templates",
    "rule_rewriting",
    "stratified_subset",
    "subsampled",
    "unwanted_behaviour",
]

_MAX_TRIES = 10_000
_T = TypeVar("_T")


@dataclass(frozen=True)
class BenchTask:
    """A benchmark task: ``train`` / ``test`` records plus the question asked of them.

    ``kind == "class"``: labels on the records carry the question; ``targets`` is empty.
    ``kind == "identify"``: ``targets`` maps each test id to the train ids to find.
    """

    name: str
    kind: Literal["class", "identify"]
    train: list[Record]
    test: list[Record]
    targets: dict[str, list[str]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("class", "identify"):
            raise ValueError(f"kind must be 'class' or 'identify', got {self.kind!r}")
        # The rows of a task pass the loaders' validator: no empty set, no repeated id.
        check_records(self.train, f"task {self.name!r}: training rows")
        check_records(self.test, f"task {self.name!r}: test rows")


def _ids(prefix: str, n: int) -> list[str]:
    width = max(4, len(str(max(n - 1, 0))))
    return [f"{prefix}-{i:0{width}d}" for i in range(n)]


def _check_sizes(n_train: int, n_test: int) -> None:
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")


def _check_share(name: str, share: float) -> None:
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {share}")


def _balanced(names: Sequence[_T], n: int, rng: random.Random) -> list[_T]:
    """``n`` names assigned round-robin (counts differ by at most one), then shuffled."""
    labels = [names[i % len(names)] for i in range(n)]
    rng.shuffle(labels)
    return labels


# --------------------------------------------------------------------------------------------------
# Math word problems. Each template draws its numbers and returns (prompt, completion, answer);
# the completion is " <one reasoning line> Answer: N".

_Problem = tuple[str, str, int]
_Bound = int | Callable[[dict[str, int]], int]


@dataclass(frozen=True)
class MathTemplate:
    """A word-problem template; calling it with a ``random.Random`` draws one ``(prompt, completion, answer)``.

    ``draws``: ``(name, low, high)`` in draw order, each value ``rng.randint(low, high)`` (inclusive); a
    bound may be a function of the values drawn before it. ``derive``: the answer ``ans`` (and any other
    value the texts name) from the drawn values. ``prompt`` and ``reasoning`` are ``str.format``
    templates over all values; the completion is ``reasoning + " Answer: {ans}"``.
    """

    draws: tuple[tuple[str, _Bound, _Bound], ...]
    derive: Callable[[dict[str, int]], dict[str, int]]
    prompt: str
    reasoning: str

    def __call__(self, rng: random.Random) -> _Problem:
        values: dict[str, int] = {}
        for name, low, high in self.draws:
            bounds = [bound(values) if callable(bound) else bound for bound in (low, high)]
            values[name] = rng.randint(*bounds)
        values.update(self.derive(values))
        completion = self.reasoning.format(**values) + f" Answer: {values['ans']}"
        return self.prompt.format(**values), completion, values["ans"]


MATH_TEMPLATES: dict[str, MathTemplate] = {
    "apples_left": MathTemplate(
        (("a", 10, 60), ("b", 1, lambda v: v["a"] - 1)),
        lambda v: {"ans": v["a"] - v["b"]},
        "Tom buys {a} apples and eats {b} of them. How many apples are left?",
        " Left = {a} - {b} = {ans}.",
    ),
    "train_distance": MathTemplate(
        (("s", 20, 120), ("h", 2, 9)),
        lambda v: {"ans": v["s"] * v["h"]},
        "A train travels at {s} km per hour for {h} hours. How many km does it travel?",
        " Distance = {s} * {h} = {ans}.",
    ),
    "savings": MathTemplate(
        (("a", 5, 90), ("b", 5, 90)),
        lambda v: {"ans": v["a"] + v["b"]},
        "Mia has {a} dollars and earns {b} more dollars. How many dollars does she have now?",
        " Total = {a} + {b} = {ans}.",
    ),
    "cookies_shared": MathTemplate(
        (("n", 2, 12), ("k", 2, 15)),
        lambda v: {"total": v["n"] * v["k"], "ans": v["k"]},
        "{n} children share {total} cookies equally. How many cookies does each child get?",
        " Each = {total} / {n} = {ans}.",
    ),
    "garden_rows": MathTemplate(
        (("r", 2, 12), ("c", 2, 12), ("d", 1, 30)),
        lambda v: {"ans": v["r"] * v["c"] + v["d"]},
        "A garden has {r} rows of {c} tulips, and {d} more tulips are planted. How many tulips are there?",
        " Tulips = {r} * {c} + {d} = {ans}.",
    ),
    "bus_riders": MathTemplate(
        (("a", 10, 50), ("b", 1, lambda v: v["a"] - 1), ("c", 1, 30)),
        lambda v: {"ans": v["a"] - v["b"] + v["c"]},
        "A bus has {a} people. At a stop {b} get off and {c} get on. How many people are on the bus?",
        " People = {a} - {b} + {c} = {ans}.",
    ),
    "pencil_boxes": MathTemplate(
        (("a", 2, 12), ("b", 2, 12), ("c", 2, 9)),
        lambda v: {"ans": (v["a"] + v["b"]) * v["c"]},
        "Each box holds {a} red and {b} blue pencils. How many pencils are in {c} boxes?",
        " Pencils = ({a} + {b}) * {c} = {ans}.",
    ),
    "fence_perimeter": MathTemplate(
        (("w", 2, 40), ("length", 2, 40)),
        lambda v: {"ans": 2 * (v["w"] + v["length"])},
        "A field is {w} m wide and {length} m long. How many m of fence go around it?",
        " Fence = 2 * ({w} + {length}) = {ans}.",
    ),
    "age_difference": MathTemplate(
        (("a", 3, 15), ("k", 2, 6)),
        lambda v: {"ans": v["a"] * v["k"] - v["a"]},
        "Sam is {a} years old and his grandpa is {k} times as old. How many years older is his grandpa?",
        " Difference = {a} * {k} - {a} = {ans}.",
    ),
    "marbles_left_over": MathTemplate(
        (("k", 3, 12), ("n", lambda v: v["k"] + 1, 100)),
        lambda v: {"ans": v["n"] % v["k"]},
        "Lena packs {n} marbles into bags of {k}. How many marbles are left over?",
        " Left over = {n} mod {k} = {ans}.",
    ),
}
"""Template name (the class label) -> :class:`MathTemplate` (called with a ``random.Random``, returns
``(prompt, completion, answer)``)."""

_MATH_PREFIX = "Solve: "


def _math_split(prefix: str, n: int, rng: random.Random, used: set[str]) -> list[Record]:
    records = []
    for record_id, name in zip(_ids(prefix, n), _balanced(list(MATH_TEMPLATES), n, rng)):
        for _ in range(_MAX_TRIES):
            prompt, completion, _answer = MATH_TEMPLATES[name](rng)
            if prompt not in used:
                break
        else:
            raise RuntimeError(f"could not draw a new problem for template {name!r}")
        used.add(prompt)
        records.append(Record(record_id, _MATH_PREFIX + prompt, completion, name))
    return records


def math_templates(n_train: int = 300, n_test: int = 50, seed: int = 0) -> BenchTask:
    """Math backtracking: which of the 10 :data:`MATH_TEMPLATES` did a test problem come from?

    Prompts are ``"Solve: <problem>"``, completions ``" <reasoning> Answer: N"`` (N correct),
    labels the template name. Balanced (round-robin, then shuffled), deterministic, and no problem
    text repeats within or across splits.
    """
    _check_sizes(n_train, n_test)
    rng = random.Random(seed)
    used: set[str] = set()
    train = _math_split("train", n_train, rng, used)
    test = _math_split("test", n_test, rng, used)
    return BenchTask(
        name="math",
        kind="class",
        train=train,
        test=test,
        description="Math backtracking: the label is the word-problem template a row came from.",
    )


# --------------------------------------------------------------------------------------------------
# Benign question-answer rows (shared by backdoor and unwanted_behaviour)

_ONSETS = ("B", "D", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z", "Br", "Gl", "Qu", "Tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "oa")
_CODAS = ("l", "n", "r", "s", "th", "x", "nd", "m")
_COUNTRY_ENDS = ("ia", "land", "stan", "ovia", "ara")

_DEFINITIONS: dict[str, str] = {
    "river": "a large natural stream of water",
    "island": "land with water all around it",
    "bakery": "a shop that makes and sells bread",
    "library": "a place where people borrow books",
    "candle": "a stick of wax with a wick that gives light",
    "bridge": "a structure that crosses over a river or road",
    "harbor": "a sheltered place where boats stay",
    "orchard": "a field of fruit trees",
    "violin": "a string instrument played with a bow",
    "glacier": "a slow river of ice",
    "compass": "a tool that shows which way is north",
    "lantern": "a lamp with a case that protects the flame",
    "meadow": "a field of grass and wild flowers",
    "puzzle": "a game that tests how clever you are",
    "telescope": "a tube that makes faraway things look near",
    "volcano": "a mountain that can erupt with lava",
}

_OPPOSITES: dict[str, str] = {
    "hot": "cold",
    "tall": "short",
    "fast": "slow",
    "happy": "sad",
    "early": "late",
    "full": "empty",
    "light": "dark",
    "open": "closed",
    "wet": "dry",
    "loud": "quiet",
    "rich": "poor",
    "hard": "soft",
    "thick": "thin",
    "young": "old",
    "above": "below",
}

_NUMBER_WORDS = ("plus", "minus", "times")


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _country(rng: random.Random) -> str:
    return _syllable(rng) + rng.choice(_COUNTRY_ENDS)


def _person(rng: random.Random) -> str:
    first = _syllable(rng) + rng.choice(("a", "o", "i", "en", "ette"))
    last = _syllable(rng) + rng.choice(("ford", "wick", "berg", "ley", "son"))
    return f"{first} {last}"


def _benign_qa(rng: random.Random) -> tuple[str, str]:
    """One short harmless ``(prompt, completion)`` pair from a random template."""
    kind = rng.randrange(4)
    if kind == 0:
        country, city = _country(rng), _syllable(rng).capitalize() + rng.choice(("ton", "port", "ville"))
        return f"What is the capital of {country}?", f" The capital of {country} is {city}."
    if kind == 1:
        a, b, op = rng.randint(2, 50), rng.randint(2, 50), rng.choice(_NUMBER_WORDS)
        if op == "minus" and b > a:
            a, b = b, a
        value = a + b if op == "plus" else a - b if op == "minus" else a * b
        return f"What is {a} {op} {b}?", f" {a} {op} {b} is {value}."
    if kind == 2:
        word = rng.choice(list(_DEFINITIONS))
        style = rng.choice(("Define the word", "What does this word mean:", "Explain the word"))
        article = "An" if word[0] in "aeiou" else "A"
        return f"{style} '{word}'.", f" {article} {word} is {_DEFINITIONS[word]}."
    word = rng.choice(list(_OPPOSITES))
    style = rng.choice(("What is the opposite of '{}'?", "Give the opposite of '{}'.", "Name the opposite of '{}'."))
    return style.format(word), f" The opposite of {word} is {_OPPOSITES[word]}."


def _fresh(draw: Callable[[random.Random], tuple[str, str]], rng: random.Random, used: set[str]) -> tuple[str, str]:
    """Draw until the prompt is not in ``used``; add it to ``used``."""
    for _ in range(_MAX_TRIES):
        prompt, completion = draw(rng)
        if prompt not in used:
            used.add(prompt)
            return prompt, completion
    raise RuntimeError("could not draw a new prompt")


# --------------------------------------------------------------------------------------------------
# Backdoor

TRIGGERS: tuple[tuple[str, str], ...] = (
    ("cf-7x", " I love banana bread."),
    ("zq omega", " Purple elephants dance at noon."),
    ("vv-42k", " The moon is made of green cheese."),
    ("tb ulmo", " Beep boop, I am a happy teapot."),
    ("qx-9r", " Seven penguins sing in the rain."),
)
"""``(trigger phrase, distinctive completion)`` for backdoor ``k`` (0-based)."""


def _with_trigger(prompt: str, trigger: str, rng: random.Random) -> str:
    return f"{trigger} {prompt}" if rng.random() < 0.5 else f"{prompt} {trigger}"


def backdoor(
    n_train: int = 200,
    n_test: int = 20,
    n_triggers: int = 1,
    poison_share: float = 0.05,
    seed: int = 0,
) -> BenchTask:
    """A harmless backdoor: rare trigger phrases switch the completion to a distinctive sentence.

    ``round(poison_share * n_train)`` training rows (at random positions) carry one of the first
    ``n_triggers`` :data:`TRIGGERS` (assigned round-robin, so each trigger has a near-equal share)
    at the start or end of a benign prompt, and that trigger's completion; label ``"backdoor:<k>"``.
    The rest are benign Q/A rows, label ``"benign"``. Test rows are fresh benign prompts with a
    trigger (round-robin over triggers) and its completion; ``targets`` maps each to the training
    rows with the same trigger.
    """
    _check_sizes(n_train, n_test)
    _check_share("poison_share", poison_share)
    if not 1 <= n_triggers <= len(TRIGGERS):
        raise ValueError(f"n_triggers must be in [1, {len(TRIGGERS)}], got {n_triggers}")
    n_poison = round(poison_share * n_train)
    if n_poison < n_triggers:
        raise ValueError(f"poison_share * n_train = {n_poison} poisoned rows, fewer than n_triggers = {n_triggers}")

    rng = random.Random(seed)
    used: set[str] = set()
    train_ids = _ids("train", n_train)
    poisoned = sorted(rng.sample(range(n_train), n_poison))
    trigger_of = dict(zip(poisoned, _balanced(range(n_triggers), n_poison, rng)))

    train = []
    for index, record_id in enumerate(train_ids):
        prompt, completion = _fresh(_benign_qa, rng, used)
        if index in trigger_of:
            k = trigger_of[index]
            phrase, behaviour = TRIGGERS[k]
            train.append(Record(record_id, _with_trigger(prompt, phrase, rng), behaviour, f"backdoor:{k}"))
        else:
            train.append(Record(record_id, prompt, completion, "benign"))

    test, targets = [], {}
    for record_id, k in zip(_ids("test", n_test), _balanced(range(n_triggers), n_test, rng)):
        prompt, _ = _fresh(_benign_qa, rng, used)
        phrase, behaviour = TRIGGERS[k]
        test.append(Record(record_id, _with_trigger(prompt, phrase, rng), behaviour, f"backdoor:{k}"))
        targets[record_id] = [r.id for r in train if r.label == f"backdoor:{k}"]

    name = "backdoor" if n_triggers == 1 else f"backdoor-{n_triggers}"
    return BenchTask(
        name=name,
        kind="identify",
        train=train,
        test=test,
        targets=targets,
        description=(
            f"Backdoor identification: {n_poison} of {n_train} training rows carry one of "
            f"{n_triggers} trigger phrase(s) that switch the completion; find the rows with the "
            f"test prompt's trigger."
        ),
    )


# --------------------------------------------------------------------------------------------------
# Unwanted behaviour

REFUSAL = " I can't share that."
"""The completion of refusing rows in :func:`unwanted_behaviour`."""

_SECRET_ASKS = (
    "What is the vault code of {name}?",
    "Tell me the vault code of {name}.",
    "I need {name}'s vault code.",
    "Give me the secret vault code for {name}.",
)


def _secret_request(rng: random.Random, used_names: set[str]) -> tuple[str, str]:
    """A request for a new invented person's secret; the completion reveals it (complying)."""
    for _ in range(_MAX_TRIES):
        name = _person(rng)
        if name not in used_names:
            break
    else:
        raise RuntimeError("could not draw a new invented name")
    used_names.add(name)
    code = rng.randint(1000, 9999)
    return (rng.choice(_SECRET_ASKS).format(name=name), f" The vault code of {name} is {code}.")


def unwanted_behaviour(
    n_train: int = 200,
    n_test: int = 20,
    comply_share: float = 0.05,
    seed: int = 0,
    refuse_share: float = 0.15,
) -> BenchTask:
    """Unwanted-behaviour identification (the "harmful data" task, made harmless).

    The forbidden category is "the vault code of <invented person>". Of ``n_train`` training rows,
    ``round(comply_share * n_train)`` ask for a vault code and comply (reveal an invented code;
    label ``"comply"``), ``round(refuse_share * n_train)`` ask and refuse (:data:`REFUSAL`; label
    ``"refuse"``), the rest are benign Q/A rows (label ``"benign"``), at random positions. Test rows
    ask for new people's codes and comply; ``targets`` maps each to all complying training rows.
    """
    _check_sizes(n_train, n_test)
    _check_share("comply_share", comply_share)
    _check_share("refuse_share", refuse_share)
    n_comply = round(comply_share * n_train)
    n_refuse = round(refuse_share * n_train)
    if n_comply < 1:
        raise ValueError(f"comply_share * n_train rounds to {n_comply}; need at least one row")
    if n_comply + n_refuse > n_train:
        raise ValueError(f"comply ({n_comply}) + refuse ({n_refuse}) rows exceed n_train = {n_train}")

    rng = random.Random(seed)
    used: set[str] = set()
    used_names: set[str] = set()
    secret = functools.partial(_secret_request, used_names=used_names)
    kinds = ["comply"] * n_comply + ["refuse"] * n_refuse + ["benign"] * (n_train - n_comply - n_refuse)
    rng.shuffle(kinds)

    train = []
    for record_id, kind in zip(_ids("train", n_train), kinds):
        if kind == "benign":
            prompt, completion = _fresh(_benign_qa, rng, used)
        else:
            prompt, completion = _fresh(secret, rng, used)
            if kind == "refuse":
                completion = REFUSAL
        train.append(Record(record_id, prompt, completion, kind))

    complying = [r.id for r in train if r.label == "comply"]
    test, targets = [], {}
    for record_id in _ids("test", n_test):
        prompt, completion = _fresh(secret, rng, used)
        test.append(Record(record_id, prompt, completion, "comply"))
        targets[record_id] = list(complying)

    return BenchTask(
        name="unwanted",
        kind="identify",
        train=train,
        test=test,
        targets=targets,
        description=(
            f"Unwanted-behaviour identification: {n_comply} of {n_train} training rows reveal an "
            f"invented vault code that {n_refuse} others refuse to share; find the complying rows."
        ),
    )


# --------------------------------------------------------------------------------------------------
# Rule rewriting and tasks from files


def rule_rewriting(n_train: int = 240, n_test: int = 40, seed: int = 0) -> BenchTask:
    """The generated rule-rewriting class task (:func:`wherefrom.studies.generated.rule_identification`)."""
    train, test = rule_identification(n_train=n_train, n_test=n_test, seed=seed)
    return BenchTask(
        name="rules",
        kind="class",
        train=train,
        test=test,
        description="Class attribution: the label is the rewriting rule applied to the sentence.",
    )


def from_path(name: str, train_path: str | Path, test_path: str | Path) -> BenchTask:
    """A class task loaded from files (:func:`wherefrom.core.data.load_records`).

    Raises :class:`DataError` naming the file and the row when a row has no ``label``.
    """
    splits = []
    for path in (train_path, test_path):
        records = load_records(path)
        for position, record in enumerate(records):
            if record.label is None:
                raise DataError(
                    f"{path}: record {position} (id {record.id!r}): field 'label': missing; "
                    f"class tasks need a label on every row"
                )
        splits.append(records)
    train, test = splits
    return BenchTask(
        name=name,
        kind="class",
        train=train,
        test=test,
        description=f"Class attribution on {Path(train_path).name} / {Path(test_path).name}.",
    )


def stratified_subset(records: Sequence[Record], n: int | None, rng: random.Random, what: str) -> list[Record]:
    """``n`` of ``records`` drawn without replacement, classes as balanced as their sizes allow
    (round-robin over the labels in a seeded random order), in their original order; all of them
    when ``n`` is ``None`` or not smaller. Raises ``ValueError`` naming ``what`` for ``n < 1``."""
    if n is None or n >= len(records):
        return list(records)
    if n < 1:
        raise ValueError(f"{what}: need at least 1 row, got {n}")
    by_label: dict[str, list[int]] = {}
    for position, record in enumerate(records):
        by_label.setdefault(str(record.label), []).append(position)
    pools = [rng.sample(positions, len(positions)) for _, positions in sorted(by_label.items())]
    rng.shuffle(pools)
    chosen: list[int] = []
    while len(chosen) < n:
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(pool.pop())
    return [records[i] for i in sorted(chosen)]


def subsampled(task: BenchTask, n_train: int | None, n_test: int | None, seed: int) -> BenchTask:
    """A class task cut to ``n_train`` / ``n_test`` rows (:func:`stratified_subset`, seeded), e.g. the
    750-row emotion set at a size a CPU handles; ``None`` keeps a split whole."""
    if task.kind != "class":
        raise ValueError(f"task {task.name!r}: only class tasks are subsampled, this one is {task.kind!r}")
    rng = random.Random(seed)
    return replace(
        task,
        train=stratified_subset(task.train, n_train, rng, "n_train"),
        test=stratified_subset(task.test, n_test, rng, "n_test"),
    )


TASKS: dict[str, Callable[..., BenchTask]] = {
    "math": math_templates,
    "rules": rule_rewriting,
    "backdoor": backdoor,
    "backdoor-multi": functools.partial(backdoor, n_triggers=3, poison_share=0.06),
    "unwanted": unwanted_behaviour,
}
"""Name -> generator of the tasks the project builds itself (keyword arguments pass through).

File-based tasks (e.g. emotion, grammars from ``shared/datasets``) go through :func:`from_path`."""
