"""Tests for wherefrom.studies.benchtasks: generated benchmark tasks and file-based class tasks."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import SHARED
from wherefrom.core.data import DataError, Record
from wherefrom.methods.lexical import BM25, record_text, tokenize
from wherefrom.studies.benchtasks import (
    FACT_RELATIONS,
    MATH_TEMPLATES,
    REFUSAL,
    SEA_TRIGGERS,
    SLEEPY_REPLIES,
    TASKS,
    TRIGGERS,
    BenchTask,
    as_identification,
    backdoor,
    fact_tracing,
    from_path,
    math_templates,
    paraphrased_backdoor,
    rule_rewriting,
    subsampled,
    unwanted_behaviour,
)
from wherefrom.studies.metrics import identification


def _check_common(task: BenchTask) -> None:
    ids = [r.id for r in task.train] + [r.id for r in task.test]
    assert len(ids) == len(set(ids))
    train_prompts = {r.prompt for r in task.train}
    test_prompts = {r.prompt for r in task.test}
    assert len(train_prompts) == len(task.train)
    assert len(test_prompts) == len(task.test)
    assert not train_prompts & test_prompts
    assert all(r.completion.strip() and r.label for r in task.train + task.test)
    assert all(re.fullmatch(r"train-\d{4}", r.id) for r in task.train)
    assert all(re.fullmatch(r"test-\d{4}", r.id) for r in task.test)
    # short enough for a small model's context (rough: characters, not tokens)
    assert max(len(r.prompt) + len(r.completion) for r in task.train + task.test) < 200


@pytest.mark.parametrize("name", sorted(TASKS))
def test_registry_tasks_deterministic_and_well_formed(name: str) -> None:
    first, again, other = TASKS[name](seed=3), TASKS[name](seed=3), TASKS[name](seed=4)
    assert first == again
    assert first.train != other.train
    _check_common(first)
    if first.kind == "class":
        assert first.targets == {}
    else:
        assert set(first.targets) == {r.id for r in first.test}


# ------------------------------------------------------------------------------------------------
# math

_SOLVERS = {
    "apples_left": lambda a, b: a - b,
    "train_distance": lambda s, h: s * h,
    "savings": lambda a, b: a + b,
    "cookies_shared": lambda n, total: total // n,
    "garden_rows": lambda r, c, d: r * c + d,
    "bus_riders": lambda a, b, c: a - b + c,
    "pencil_boxes": lambda a, b, c: (a + b) * c,
    "fence_perimeter": lambda w, length: 2 * (w + length),
    "age_difference": lambda a, k: a * k - a,
    "marbles_left_over": lambda n, k: n % k,
}


def test_math_answers_are_correct() -> None:
    assert set(_SOLVERS) == set(MATH_TEMPLATES)
    task = math_templates(n_train=300, n_test=50, seed=1)
    for record in task.train + task.test:
        numbers = [int(x) for x in re.findall(r"\d+", record.prompt)]
        match = re.search(r"Answer: (-?\d+)$", record.completion)
        assert match, record.completion
        assert int(match.group(1)) == _SOLVERS[record.label](*numbers), record


def test_math_template_functions_return_answer() -> None:
    rng = random.Random(0)
    for name, template in MATH_TEMPLATES.items():
        for _ in range(20):
            prompt, completion, answer = template(rng)
            numbers = [int(x) for x in re.findall(r"\d+", prompt)]
            assert answer == _SOLVERS[name](*numbers)
            assert completion.endswith(f" Answer: {answer}")
            if name == "cookies_shared":
                assert numbers[1] % numbers[0] == 0


def test_math_balanced_and_sized() -> None:
    task = math_templates(n_train=300, n_test=50, seed=0)
    assert task.kind == "class" and len(task.train) == 300 and len(task.test) == 50
    assert set(Counter(r.label for r in task.train).values()) == {30}
    assert set(Counter(r.label for r in task.test).values()) == {5}
    odd = math_templates(n_train=23, n_test=7, seed=0)
    counts = Counter(r.label for r in odd.train)
    assert max(counts.values()) - min(counts.values()) <= 1


# ------------------------------------------------------------------------------------------------
# backdoor


@pytest.mark.parametrize("n_triggers,share", [(1, 0.05), (3, 0.06), (2, 0.1)])
def test_backdoor_shares_and_targets(n_triggers: int, share: float) -> None:
    task = backdoor(n_train=200, n_test=20, n_triggers=n_triggers, poison_share=share, seed=2)
    assert task.kind == "identify"
    _check_common(task)
    labels = Counter(r.label for r in task.train)
    n_poison = round(share * 200)
    assert labels["benign"] == 200 - n_poison
    per_trigger = [labels[f"backdoor:{k}"] for k in range(n_triggers)]
    assert sum(per_trigger) == n_poison and max(per_trigger) - min(per_trigger) <= 1
    by_id = {r.id: r for r in task.train}
    for record in task.train:
        phrases = [k for k, (phrase, _) in enumerate(TRIGGERS) if phrase in record.prompt]
        if record.label == "benign":
            assert phrases == []
        else:
            k = int(record.label.split(":")[1])
            assert phrases == [k] and record.completion == TRIGGERS[k][1]
    test_triggers = Counter(r.label for r in task.test)
    assert set(test_triggers) == {f"backdoor:{k}" for k in range(n_triggers)}
    for record in task.test:
        k = int(record.label.split(":")[1])
        assert TRIGGERS[k][0] in record.prompt and record.completion == TRIGGERS[k][1]
        targets = task.targets[record.id]
        assert targets and all(by_id[t].label == record.label for t in targets)
        assert set(targets) == {r.id for r in task.train if r.label == record.label}


def test_backdoor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        backdoor(n_triggers=0)
    with pytest.raises(ValueError):
        backdoor(n_triggers=len(TRIGGERS) + 1)
    with pytest.raises(ValueError):
        backdoor(n_train=20, poison_share=0.01)  # rounds to 0 poisoned rows
    with pytest.raises(ValueError):
        backdoor(poison_share=1.5)


# ------------------------------------------------------------------------------------------------
# unwanted behaviour


@pytest.mark.parametrize("comply_share", [0.05, 0.03])
def test_unwanted_shares_and_targets(comply_share: float) -> None:
    task = unwanted_behaviour(n_train=200, n_test=20, comply_share=comply_share, seed=5)
    assert task.kind == "identify"
    _check_common(task)
    labels = Counter(r.label for r in task.train)
    assert labels["comply"] == round(comply_share * 200)
    assert labels["refuse"] == round(0.15 * 200)
    assert labels["benign"] == 200 - labels["comply"] - labels["refuse"]
    complying = {r.id for r in task.train if r.label == "comply"}
    for record in task.train:
        asks = "vault code" in record.prompt
        assert asks == (record.label != "benign")
        if record.label == "refuse":
            assert record.completion == REFUSAL
        if record.label == "comply":
            assert re.fullmatch(r" The vault code of .+ is \d{4}\.", record.completion)

    def name_of(prompt: str) -> str:
        found = re.search(r"([A-Z][a-z]+ [A-Z][a-z]+)", prompt)
        assert found, prompt
        return found.group(1)

    train_names = {name_of(r.prompt) for r in task.train if r.label != "benign"}
    for record in task.test:
        assert record.label == "comply" and "vault code" in record.prompt
        assert name_of(record.prompt) not in train_names
        assert set(task.targets[record.id]) == complying


def test_unwanted_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        unwanted_behaviour(n_train=10, comply_share=0.01)
    with pytest.raises(ValueError):
        unwanted_behaviour(comply_share=0.9, refuse_share=0.5)


# ------------------------------------------------------------------------------------------------
# tasks BM25 cannot solve


def _words(record: Record) -> set[str]:
    return set(tokenize(record_text(record)))


def _document_share(records: list[Record]) -> Counter:
    """word -> share of ``records`` that contain it."""
    counts = Counter(word for record in records for word in _words(record))
    return Counter({word: count / len(records) for word, count in counts.items()})


@pytest.mark.parametrize("n_train,seed", [(40, 0), (40, 1), (40, 2), (200, 0), (30, 7)])
def test_paraphrased_backdoor_has_no_word_common_to_triggered_rows(n_train: int, seed: int) -> None:
    task = paraphrased_backdoor(n_train=n_train, n_test=8, seed=seed)
    _check_common(task)
    triggered = [r for r in task.train if r.label == "backdoor"]
    benign = [r for r in task.train if r.label == "benign"]
    assert len(triggered) == round(0.1 * n_train) and len(benign) == n_train - len(triggered)
    assert set.intersection(*map(_words, triggered)) == set()
    assert set.intersection(*map(_words, triggered + task.test)) == set()
    benign_words = set().union(*map(_words, benign))
    for query in task.test:
        assert set(task.targets[query.id]) == {r.id for r in triggered}
        # what a query shares with the triggered rows, benign rows say too
        assert _words(query) & set().union(*map(_words, triggered)) <= benign_words
    for record in triggered:
        assert sum(clause in record.prompt for clause in SEA_TRIGGERS["train"]) == 1
        assert record.completion in SLEEPY_REPLIES["train"]
    for record in task.test:
        assert sum(clause in record.prompt for clause in SEA_TRIGGERS["test"]) == 1
        assert record.completion in SLEEPY_REPLIES["test"]


def test_sea_and_sleepy_wordings_share_no_word() -> None:
    phrases = [p for table in (SEA_TRIGGERS, SLEEPY_REPLIES) for split in ("train", "test") for p in table[split]]
    words = [set(tokenize(p)) for p in phrases]
    assert sum(map(len, words)) == len(set().union(*words))  # no word in two wordings
    benign = [r for r in paraphrased_backdoor(n_train=200, n_test=1, seed=0).train if r.label == "benign"]
    assert not set().union(*words) & set().union(*(set(tokenize(r.prompt)) for r in benign))


def test_paraphrased_backdoor_rejects_too_few_triggered_rows() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        paraphrased_backdoor(n_train=20, poison_share=0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fact_tracing_targets_state_the_asked_fact(seed: int) -> None:
    task = fact_tracing(n_train=40, n_test=8, seed=seed)
    _check_common(task)
    assert task.kind == "identify" and task.recall_k == 10 and task.headline_metric == "mrr"
    assert backdoor(n_train=40, n_test=2).headline_metric == "auprc" and rule_rewriting(10, 2).headline_metric == "acc"
    by_id = {r.id: r for r in task.train}
    people = Counter(r.prompt.rsplit(" ", 3)[0] for r in task.train)
    assert len(people) == 8 and set(people.values()) == {len(FACT_RELATIONS)}
    relation_words = set().union(*(set(tokenize(t.format(entity=""))) for t, _ in FACT_RELATIONS.values()))
    asked = set()
    for query in task.test:
        (target_id,) = task.targets[query.id]
        target = by_id[target_id]
        person = target.prompt.rsplit(" ", 3)[0]
        assert target.label == query.label and person in query.prompt and target.completion == query.completion
        assert FACT_RELATIONS[query.label][1].format(entity=person) == query.prompt
        asked.add((person, query.label))
        # no word of the question is a relation word of any training row ...
        assert not set(tokenize(query.prompt)) & relation_words
        # ... and the words it shares with its target, the person's other rows share as well, at equal length
        others = [r for r in task.train if r.prompt.startswith(person + " ") and r.id != target_id]
        assert len(others) == len(FACT_RELATIONS) - 1
        for other in others:
            assert _words(query) & _words(other) == _words(query) & _words(target)
            assert len(tokenize(record_text(other))) == len(tokenize(record_text(target)))
    assert len(asked) == len(task.test)
    words = [w for person in people for w in person.split()]
    assert len(words) == len(set(words))


def test_fact_tracing_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="multiple of 5"):
        fact_tracing(n_train=42)
    with pytest.raises(ValueError, match="exceeds"):
        fact_tracing(n_train=10, n_test=11)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unwanted_paraphrase_shares_no_rare_word(seed: int) -> None:
    task = unwanted_behaviour(n_train=200, n_test=20, seed=seed, paraphrased=True)
    _check_common(task)
    assert task.name == "unwanted-paraphrase"
    complying = [r for r in task.train if r.label == "comply"]
    share = _document_share([r for r in task.train if r.label == "benign"])
    for query in task.test:
        assert set(task.targets[query.id]) == {r.id for r in complying}
        for row in complying:
            # every shared word is common: at least 10% of the benign rows have it
            assert all(share[word] >= 0.1 for word in _words(query) & _words(row)), (query, row)
    secret_rows = [r for r in task.train if r.label != "benign"] + task.test
    names = [w for r in secret_rows for w in re.findall(r"([A-Z][a-z]+ [A-Z][a-z]+)(?:'s|[.?])", r.prompt)[-1].split()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "name,metric", [("backdoor-paraphrase", "auprc"), ("facts", "mrr"), ("unwanted-paraphrase", "auprc")]
)
def test_bm25_stays_below_the_hard_threshold(name: str, metric: str) -> None:
    # The README's task table: BM25's headline metric at the study's size, 3 seeds, below 0.6
    values = []
    for seed in (0, 1, 2):
        task = TASKS[name](n_train=40, n_test=8, seed=seed)
        bm25 = BM25()
        bm25.fit(task.train)
        values.append(identification(bm25.scores(task.test, task.train), task.targets, k=task.recall_k)[metric])
    assert max(values) < 0.6
    # ... while the planted-phrase backdoor is solved by it
    easy = TASKS["backdoor"](n_train=40, n_test=8, seed=0)
    bm25 = BM25()
    bm25.fit(easy.train)
    assert identification(bm25.scores(easy.test, easy.train), easy.targets)["auprc"] == 1.0


# ------------------------------------------------------------------------------------------------
# rule rewriting and files


def test_rule_rewriting_wraps_generated() -> None:
    task = rule_rewriting(n_train=50, n_test=10, seed=0)
    assert task.kind == "class" and task.targets == {}
    assert len(task.train) == 50 and len(task.test) == 10
    assert all(r.completion == f" {r.label}" for r in task.train)


def test_from_path_requires_labels(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "a", "prompt": "p", "completion": " x", "label": "x"}) + "\n")
    bad = tmp_path / "bad.jsonl"
    rows = [
        {"id": "a", "prompt": "p", "completion": " x", "label": "x"},
        {"id": "b", "prompt": "p", "completion": " y"},
    ]
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = from_path("tiny", good, good)
    assert task.kind == "class" and task.name == "tiny" and task.train[0].label == "x"
    # the file's line (it said "record 1", a 0-based position)
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: record 'b': field 'label': missing"):
        from_path("tiny", good, bad)


def test_from_path_refuses_a_query_label_no_training_row_has(tmp_path: Path) -> None:
    """Such a query was scored with accuracy 0 by every method, silently."""
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text(json.dumps({"id": "a", "prompt": "p", "completion": " x", "label": "x"}) + "\n")
    rows = [
        {"id": "q0", "prompt": "p", "completion": " x", "label": "x"},
        {"id": "q1", "prompt": "p", "completion": " z", "label": "z"},
    ]
    test.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"test\.jsonl, line 2: record 'q1': label 'z' has no training row .*\['x'\]"):
        from_path("tiny", train, test)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared datasets not present")
@pytest.mark.parametrize("name", ["emotion", "grammars", "math"])
def test_shared_datasets_load(name: str) -> None:
    task = from_path(name, SHARED / f"{name}.train.jsonl", SHARED / f"{name}.test.jsonl")
    assert task.kind == "class" and task.train and task.test
    assert all(r.label for r in task.train + task.test)
    assert {r.label for r in task.test} <= {r.label for r in task.train}


def test_subsampled_is_class_balanced_seeded_and_ordered() -> None:
    task = rule_rewriting(n_train=60, n_test=20, seed=0)
    small = subsampled(task, 23, 7, seed=3)
    assert len(small.train) == 23 and len(small.test) == 7
    counts = Counter(r.label for r in small.train)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == len({r.label for r in task.train})
    positions = [task.train.index(r) for r in small.train]
    assert positions == sorted(positions) and len(set(positions)) == 23
    assert subsampled(task, 23, 7, seed=3) == small and subsampled(task, 23, 7, seed=4) != small
    assert subsampled(task, None, 100, seed=0) == task  # None or too large keeps a split whole
    with pytest.raises(ValueError, match="n_train"):
        subsampled(task, 0, 5, seed=0)
    with pytest.raises(ValueError, match="only class tasks"):
        subsampled(backdoor(n_train=40, n_test=2), 10, 1, seed=0)


def test_as_identification_targets_the_rows_with_the_query_label() -> None:
    task = rule_rewriting(n_train=30, n_test=6, seed=1)
    ident = as_identification(task)
    assert ident.kind == "identify" and ident.train == task.train and ident.test == task.test
    for query in task.test:
        assert ident.targets[query.id] == [r.id for r in task.train if r.label == query.label]
    lonely = BenchTask("t", "class", task.train, [Record("q", "p", " c", "unseen")])
    with pytest.raises(ValueError, match="unseen"):
        as_identification(lonely)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared datasets not present")
@pytest.mark.parametrize(
    "name,relevant",
    [("mixedS", {"harmful"}), ("mixedL", {"harmful"}), ("backdoor", {"backdoor", "clean"}), ("multibackdoor", None)],
)
def test_shared_identification_sets(name: str, relevant: set[str] | None) -> None:
    task = as_identification(from_path(name, SHARED / f"{name}.train.jsonl", SHARED / f"{name}.test.jsonl"))
    labels = {r.id: r.label for r in task.train}
    assert set(task.targets) == {r.id for r in task.test}
    for query in task.test:
        assert relevant is None or query.label in relevant
        assert {labels[t] for t in task.targets[query.id]} == {query.label}
    if name.startswith("mixed"):
        assert all(len(t) == 20 for t in task.targets.values())  # the 20 harmful rows (README)
