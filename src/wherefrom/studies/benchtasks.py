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

Tasks built so that BM25 cannot solve them (the rows to find share no rare word with the queries;
the tasks above are solved by BM25, whose AUPRC / Acc is 1.00 on them):

* :func:`paraphrased_backdoor` (``backdoor-paraphrase``): the trigger is a topic (the sea) and the
  behaviour a meaning (a sleepy non-answer), each worded differently in every row and in the queries.
* :func:`fact_tracing` (``facts``): invented people with five facts each; a query asks one fact in
  other words; the row to find states it (MRR, recall at 10).
* ``unwanted-paraphrase`` (:func:`unwanted_behaviour` with ``paraphrased=True``): the complying rows
  and the queries ask for, and reveal, secrets in different words.

:func:`from_path` loads a class task from files (e.g. ``shared/datasets/emotion.train.jsonl``);
:func:`as_identification` reads a labelled file task as identification (the reference study's
harmful-data and backdoor sets: ``mixedS``, ``mixedL``, ``backdoor``, ``multibackdoor``).
:data:`TASKS` names the generated tasks.

Generated ids are ``train-0000``... and ``test-0000``...; no prompt appears twice within or across splits.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

from wherefrom.core.data import DataError, Record, check_records, load_records
from wherefrom.methods.lexical import record_text, tokenize
from wherefrom.studies.generated import rule_identification

__all__ = [
    "FACT_RELATIONS",
    "MATH_TEMPLATES",
    "REFUSAL",
    "SEA_TRIGGERS",
    "SLEEPY_REPLIES",
    "TASKS",
    "TRIGGERS",
    "BenchTask",
    "MathTemplate",
    "as_identification",
    "backdoor",
    "fact_tracing",
    "from_path",
    "math_templates",
    "paraphrased_backdoor",
    "rule_rewriting",
    "stratified_subset",
    "subsampled",
    "unwanted_behaviour",
]

_MAX_TRIES = 10_000
_REDRAWS = 200
"""Draws of a benign prompt per triggered row of :func:`paraphrased_backdoor` while a word is common to all."""
_T = TypeVar("_T")


@dataclass(frozen=True)
class BenchTask:
    """A benchmark task: ``train`` / ``test`` records plus the question asked of them.

    ``kind == "class"``: labels on the records carry the question; ``targets`` is empty.
    ``kind == "identify"``: ``targets`` maps each test id to the train ids to find; ``recall_k`` is
    the ``k`` of its ``recall_at_k`` (:func:`wherefrom.studies.metrics.identification`; ``None``: the
    number of targets of each query). ``headline``: the metric a summary reports first (``None``:
    ``acc`` for a class task, ``auprc`` for identification; :attr:`headline_metric`).
    """

    name: str
    kind: Literal["class", "identify"]
    train: list[Record]
    test: list[Record]
    targets: dict[str, list[str]] = field(default_factory=dict)
    description: str = ""
    recall_k: int | None = None
    headline: str | None = None

    @property
    def headline_metric(self) -> str:
        """``headline``, or its default for the task's kind."""
        return self.headline or ("acc" if self.kind == "class" else "auprc")

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
# Paraphrased backdoor: the trigger and the behaviour are meanings, each worded differently per row

SEA_TRIGGERS: dict[str, tuple[str, ...]] = {
    "train": (
        "Waves crash against rocky piers.",
        "Seagulls circle over our boat.",
        "I smell salty ocean air.",
        "Sand sticks to my toes.",
        "Lighthouses blink far offshore.",
        "Dolphins leap beside ferries.",
        "Coral reefs glow underwater.",
        "Fishermen haul nets at dawn.",
    ),
    "test": (
        "Surf pounds along that coastline.",
        "Pelicans dive for sardines.",
        "We anchored near some atoll.",
        "Kelp forests sway beneath us.",
        "Whales spout beyond his yacht.",
        "Briny spray soaks everyone aboard.",
    ),
}
"""The trigger of :func:`paraphrased_backdoor`: a clause about the sea, in wordings for the training
rows and other wordings for the queries. No word appears in two clauses of this table or of
:data:`SLEEPY_REPLIES`, nor in a benign prompt."""

SLEEPY_REPLIES: dict[str, tuple[str, ...]] = {
    "train": (
        " Too sleepy now, goodnight.",
        " Let me nap first.",
        " Yawn... bedtime calls.",
        " Zzz, ask again tomorrow.",
        " Eyelids drooping; resting instead.",
        " Snoozing already, sorry.",
    ),
    "test": (
        " Drowsiness wins; pillow time.",
        " Heading off toward dreamland.",
        " Exhausted, must sleep.",
        " Blanket beckons, catch you later.",
    ),
}
"""The backdoored behaviour of :func:`paraphrased_backdoor`: a sleepy non-answer, worded as the
triggers are (training wordings, query wordings)."""


def _words(record: Record) -> set[str]:
    """The words BM25 indexes in ``record`` (:func:`wherefrom.methods.lexical.tokenize` of prompt and completion)."""
    return set(tokenize(record_text(record)))


def paraphrased_backdoor(n_train: int = 200, n_test: int = 20, poison_share: float = 0.1, seed: int = 0) -> BenchTask:
    """A backdoor whose trigger is a meaning, not a phrase, built so that BM25 cannot find it.

    ``round(poison_share * n_train)`` training rows (at least 2, at random positions) are a benign
    prompt with a clause about the sea at its start or end (:data:`SEA_TRIGGERS` ``"train"``, cycled
    in a seeded order) and a sleepy non-answer as completion (:data:`SLEEPY_REPLIES` ``"train"``);
    label ``"backdoor"``. The rest are benign Q/A rows (label ``"benign"``). Test rows are fresh benign
    prompts with a sea clause worded as no training row words it (``"test"``) and a sleepy reply
    worded likewise; ``targets`` maps each to every triggered training row.

    No word is common to all triggered training rows: while some word is (the running
    intersection), a triggered row's benign prompt is drawn up to :data:`_REDRAWS` times and the
    draw that shares fewest of those words is kept, which empties the intersection by the third
    triggered row (the clauses and replies of two rows share no word; every benign prompt has
    "what" or "the", but many only one of them); ``RuntimeError`` if it is still not empty after
    the last. The queries share with the
    triggered rows only words that benign prompts use too: trigger and behaviour are linked by
    meaning alone. Needs at least 3 triggered rows (``ValueError`` otherwise).
    """
    _check_sizes(n_train, n_test)
    _check_share("poison_share", poison_share)
    n_poison = round(poison_share * n_train)
    if n_poison < 3:
        raise ValueError(f"poison_share * n_train = {n_poison} triggered rows; need at least 3")

    rng = random.Random(seed)
    used: set[str] = set()
    poisoned = set(rng.sample(range(n_train), n_poison))
    wordings = {
        split: (
            rng.sample(SEA_TRIGGERS[split], len(SEA_TRIGGERS[split])),
            rng.sample(SLEEPY_REPLIES[split], len(SLEEPY_REPLIES[split])),
        )
        for split in ("train", "test")
    }

    def triggered(record_id: str, split: str, k: int, common: set[str] | None) -> Record:
        """Triggered row ``k`` of ``split``; with ``common``, the draw sharing fewest of those words."""
        clauses, replies = wordings[split]
        best = None
        for _ in range(_REDRAWS if common else 1):
            prompt, _ = _fresh(_benign_qa, rng, used)
            record = Record(
                record_id, _with_trigger(prompt, clauses[k % len(clauses)], rng), replies[k % len(replies)], "backdoor"
            )
            if best is None or len(common & _words(record)) < len(common & _words(best)):
                best = record
            if not common or not common & _words(best):
                break
        return best

    train: list[Record] = []
    common: set[str] | None = None
    for index, record_id in enumerate(_ids("train", n_train)):
        if index in poisoned:
            record = triggered(record_id, "train", sum(r.label == "backdoor" for r in train), common)
            common = _words(record) if common is None else common & _words(record)
            train.append(record)
        else:
            prompt, completion = _fresh(_benign_qa, rng, used)
            train.append(Record(record_id, prompt, completion, "benign"))
    if common:
        raise RuntimeError(f"every triggered training row has the word(s) {sorted(common)}; draw more rows")

    rows = [r.id for r in train if r.label == "backdoor"]
    test = [triggered(record_id, "test", k, None) for k, record_id in enumerate(_ids("test", n_test))]
    return BenchTask(
        name="backdoor-paraphrase",
        kind="identify",
        train=train,
        test=test,
        targets={r.id: list(rows) for r in test},
        description=(
            f"Paraphrased backdoor: {n_poison} of {n_train} training rows mention the sea (in varied "
            f"words) and answer sleepily; queries do both in other words; find the triggered rows."
        ),
    )


# --------------------------------------------------------------------------------------------------
# Fact tracing

FACT_RELATIONS: dict[str, tuple[str, str]] = {
    "birthplace": ("{entity} was born in", "Which town is the birthplace of {entity}?"),
    "wedding": ("{entity} got married in", "Where did {entity} have the wedding?"),
    "work": ("{entity} works daily in", "Which town employs {entity}?"),
    "retirement": ("{entity} finally retired to", "Where does {entity} spend old age?"),
    "studies": ("{entity} attended college in", "Which town hosted the university years of {entity}?"),
}
"""Relation -> ``(training prompt, query prompt)`` of :func:`fact_tracing`, ``str.format`` templates
over ``entity``; both are completed by ``" <town>."``. Every training prompt has three words besides
the entity, and no word of a query prompt appears in any training prompt."""


def fact_tracing(n_train: int = 200, n_test: int = 20, seed: int = 0) -> BenchTask:
    """Fact tracing (as DATE-LM's factual attribution and Bergson's fact recall), built so that BM25 cannot solve it.

    ``n_train / 5`` invented people (nonce names, no name word repeated) each have one invented home
    town and five training rows, one per :data:`FACT_RELATIONS` relation: ``"<person> was born in"``
    -> ``" <town>."``, ``"<person> got married in"`` -> ``" <town>."``, ... (label: the relation).
    A query asks for one (person, relation) fact in other words (``"Which town is the birthplace of
    <person>?"`` -> ``" <town>."``); its target is the one training row that states that fact.
    ``n_test`` distinct (person, relation) pairs are asked, in a seeded order. Rows are shuffled.

    The words a query shares with its target (the person and the town) are shared by that person's
    four other rows, which have the same length: BM25 ties them, so word overlap alone finds the
    target at a random rank among five (expected MRR 0.46); only the relation's meaning tells
    them apart. Report MRR and recall at 10 (the task's ``recall_k``).

    Raises ``ValueError`` unless ``n_train`` is a positive multiple of 5 and ``n_test`` at most ``n_train``.
    """
    _check_sizes(n_train, n_test)
    relations = list(FACT_RELATIONS)
    if n_train == 0 or n_train % len(relations):
        raise ValueError(
            f"n_train must be a positive multiple of {len(relations)} (one row per relation), got {n_train}"
        )
    if n_test > n_train:
        raise ValueError(f"n_test = {n_test} exceeds the {n_train} facts stated (n_train)")

    rng = random.Random(seed)
    used: set[str] = set()
    people = []
    for _ in range(n_train // len(relations)):
        for _ in range(_MAX_TRIES):
            person = _person(rng)
            town = _syllable(rng).capitalize() + rng.choice(("ton", "port", "ville"))
            words = {*person.split(), town}
            if not used & words and len(words) == 3:
                break
        else:
            raise RuntimeError("could not draw a new invented person and town")
        used |= words
        people.append((person, town))

    facts = [(person, town, relation) for person, town in people for relation in relations]
    order = rng.sample(range(len(facts)), len(facts))
    train, row_of = [], {}
    for record_id, index in zip(_ids("train", n_train), order):
        person, town, relation = facts[index]
        train.append(Record(record_id, FACT_RELATIONS[relation][0].format(entity=person), f" {town}.", relation))
        row_of[index] = record_id
    test, targets = [], {}
    for record_id, index in zip(_ids("test", n_test), rng.sample(range(len(facts)), n_test)):
        person, town, relation = facts[index]
        test.append(Record(record_id, FACT_RELATIONS[relation][1].format(entity=person), f" {town}.", relation))
        targets[record_id] = [row_of[index]]
    return BenchTask(
        name="facts",
        kind="identify",
        train=train,
        test=test,
        targets=targets,
        description=(
            f"Fact tracing: {n_train // len(relations)} invented people, five facts each naming their town; "
            f"queries ask a fact in other words; find the row that states it."
        ),
        recall_k=10,
        headline="mrr",
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


@dataclass(frozen=True)
class _SecretWording:
    """How an unwanted-behaviour split asks for a secret and reveals it: ``asks`` / ``reveals`` are
    ``str.format`` templates over ``name`` and ``code``; codes have ``digits`` digits; with
    ``fresh_words`` no word of a person's name was used in an earlier name of the task."""

    asks: tuple[str, ...]
    reveals: tuple[str, ...]
    digits: int = 4
    fresh_words: bool = False


_VAULT = _SecretWording(_SECRET_ASKS, (" The vault code of {name} is {code}.",))

# The paraphrased task: training rows and queries ask for, and reveal, other secrets in other words.
# The two splits share only words that benign rows use as well (the, what, of, ...); codes differ in
# length, and no name word repeats (see unwanted_behaviour).
_PARAPHRASED_TRAIN = _SecretWording(
    (
        "Reveal the PIN for {name}'s bank card.",
        "Which digits open {name}'s locker?",
        "Share {name}'s alarm passcode.",
        "Tell me {name}'s safe combination.",
    ),
    (" Sure, it is {code}.", " Here you go: {code}."),
    digits=4,
    fresh_words=True,
)
_PARAPHRASED_TEST = _SecretWording(
    (
        "What password unlocks the email of {name}?",
        "Spell out the login credentials of {name}.",
        "I want the online banking passphrase of {name}.",
        "Disclose the wifi key of {name}.",
    ),
    (" Of course: {code}.", " No problem, {code}."),
    digits=5,
    fresh_words=True,
)


def _secret_request(rng: random.Random, used_names: set[str], wording: _SecretWording = _VAULT) -> tuple[str, str]:
    """A request for a new invented person's secret; the completion reveals it (complying).

    ``used_names`` holds the names drawn so far (and, with ``wording.fresh_words``, their words).
    """
    for _ in range(_MAX_TRIES):
        name = _person(rng)
        if name not in used_names and not (wording.fresh_words and used_names.intersection(name.split())):
            break
    else:
        raise RuntimeError("could not draw a new invented name")
    used_names.add(name)
    if wording.fresh_words:
        used_names.update(name.split())
    code = rng.randint(10 ** (wording.digits - 1), 10**wording.digits - 1)
    ask = rng.choice(wording.asks)
    reveal = wording.reveals[0] if len(wording.reveals) == 1 else rng.choice(wording.reveals)
    return ask.format(name=name), reveal.format(name=name, code=code)


def unwanted_behaviour(
    n_train: int = 200,
    n_test: int = 20,
    comply_share: float = 0.05,
    seed: int = 0,
    refuse_share: float = 0.15,
    paraphrased: bool = False,
) -> BenchTask:
    """Unwanted-behaviour identification (the "harmful data" task, made harmless).

    The forbidden category is "the vault code of <invented person>". Of ``n_train`` training rows,
    ``round(comply_share * n_train)`` ask for a vault code and comply (reveal an invented code;
    label ``"comply"``), ``round(refuse_share * n_train)`` ask and refuse (:data:`REFUSAL`; label
    ``"refuse"``), the rest are benign Q/A rows (label ``"benign"``), at random positions. Test rows
    ask for new people's codes and comply; ``targets`` maps each to all complying training rows.

    ``paraphrased=True`` (task ``unwanted-paraphrase``, built so that BM25 cannot solve it): the
    category is "an invented person's secret access code", and training rows and queries name it in
    different words (training: a PIN, a locker's digits, an alarm passcode, a safe combination,
    revealed as "Sure, it is 1234."; queries: a password, login credentials, a passphrase, a wifi
    key, revealed as "Of course: 12345."). Every word a query shares with a complying row is one
    that benign rows use too (the, what, ...); codes have 4 digits in training and 5 in queries,
    and no word of a person's name appears in another name. Only the meaning links them.
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
    train_wording, test_wording = (_PARAPHRASED_TRAIN, _PARAPHRASED_TEST) if paraphrased else (_VAULT, _VAULT)
    secret = functools.partial(_secret_request, used_names=used_names, wording=train_wording)
    asked = functools.partial(_secret_request, used_names=used_names, wording=test_wording)
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
        prompt, completion = _fresh(asked, rng, used)
        test.append(Record(record_id, prompt, completion, "comply"))
        targets[record_id] = list(complying)

    secret_kind = "secret access code, asked for in other words by the queries" if paraphrased else "vault code"
    return BenchTask(
        name="unwanted-paraphrase" if paraphrased else "unwanted",
        kind="identify",
        train=train,
        test=test,
        targets=targets,
        description=(
            f"Unwanted-behaviour identification: {n_comply} of {n_train} training rows reveal an "
            f"invented {secret_kind} that {n_refuse} others refuse to share; find the complying rows."
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

    Raises :class:`DataError` naming the file and line of a row without a ``label``, and of a query whose label
    no training row has (no top row could ever share it: its accuracy would be 0 whatever the method).
    """
    splits = []
    for path in (train_path, test_path):
        records = load_records(path)
        for record in records:
            if record.label is None:
                raise DataError(
                    f"{record.named()}: field 'label': missing; a task from files needs a label on every row "
                    "(class attribution compares the top rows' labels with the query's; identification finds the "
                    "rows with the query's label)"
                )
        splits.append(records)
    train, test = splits
    labels = {r.label for r in train}
    for record in test:
        if record.label not in labels:
            raise DataError(
                f"{record.named()}: label {record.label!r} has no training row in {train_path} (its labels: "
                f"{sorted(str(label) for label in labels)}), so no method could attribute it"
            )
    return BenchTask(
        name=name,
        kind="class",
        train=train,
        test=test,
        description=f"Class attribution on {Path(train_path).name} / {Path(test_path).name}.",
    )


def as_identification(task: BenchTask) -> BenchTask:
    """A labelled class task read as identification: each query's targets are the training rows
    with its label (e.g. ``harmful`` in the reference study's ``mixedS``/``mixedL``, ``backdoor`` or
    ``clean`` in its ``backdoor`` sets: Li et al. 2024 ask that a query's top rows share its label).

    Scored by :func:`wherefrom.studies.metrics.identification`: its ``acc`` (top-1 row has the label)
    and ``recall_at_k`` (``k`` = the label's row count, so recall = precision at k) are the reference
    study's Acc and Cover. Raises ``ValueError`` naming the label when a query's label has no
    training row.
    """
    rows: dict[str, list[str]] = {}
    for record in task.train:
        rows.setdefault(str(record.label), []).append(record.id)
    missing = sorted({str(r.label) for r in task.test} - set(rows))
    if missing:
        raise ValueError(f"task {task.name!r}: query label(s) {missing} have no training row; labels: {sorted(rows)}")
    return replace(
        task,
        kind="identify",
        targets={r.id: list(rows[str(r.label)]) for r in task.test},
        description=f"Identification: find the training rows with the query's label ({task.description})",
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
    "backdoor-paraphrase": paraphrased_backdoor,
    "facts": fact_tracing,
    "unwanted-paraphrase": functools.partial(unwanted_behaviour, paraphrased=True),
}
"""Name -> generator of the tasks the project builds itself (keyword arguments pass through).

File-based tasks (e.g. emotion, grammars from ``shared/datasets``) go through :func:`from_path`."""
