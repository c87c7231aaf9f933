"""Tests for wherefrom.studies.generated: the rule-identification task and write_jsonl."""

from __future__ import annotations

from collections import Counter

import pytest

from wherefrom.core.data import load_records
from wherefrom.studies.generated import PROMPT_TEMPLATE, RULES, WORDS, rule_identification, write_jsonl


def _parse(prompt: str) -> tuple[list[str], list[str]]:
    head = "Determine the rewriting rule: "
    assert prompt.startswith(head) and prompt.endswith("\nRule:")
    sentence, rewritten = prompt[len(head) : -len("\nRule:")].split(" -> ")
    return sentence.split(" "), rewritten.split(" ")


def test_format_and_rules_are_applied():
    train, test = rule_identification(n_train=50, n_test=10, seed=3)
    assert len(train) == 50 and len(test) == 10
    for record in train + test:
        words, rewritten = _parse(record.prompt)
        assert record.completion == f" {record.label}"
        assert record.label in RULES
        assert 3 <= len(words) <= 5 and all(w in WORDS for w in words)
        assert len(set(words)) == len(words)
        assert RULES[record.label](words) == rewritten
        assert rewritten != words
        # unambiguous: no other rule gives the same rewrite
        assert all(RULES[o](words) != rewritten for o in RULES if o != record.label)
        assert record.prompt == PROMPT_TEMPLATE.format(sentence=" ".join(words), rewritten=" ".join(rewritten))
    assert [r.id for r in train[:2]] == ["train-0000", "train-0001"]
    assert test[-1].id == "test-0009"


def test_balanced_classes():
    train, test = rule_identification(n_train=240, n_test=40, seed=0)
    assert set(Counter(r.label for r in train).values()) == {48}
    assert set(Counter(r.label for r in test).values()) == {8}
    train, _ = rule_identification(n_train=12, n_test=0, seed=1)  # 12 = 2*5 + 2
    assert sorted(Counter(r.label for r in train).values()) == [2, 2, 2, 3, 3]
    # shuffled, not in round-robin order
    train, _ = rule_identification(n_train=40, n_test=0, seed=0)
    assert [r.label for r in train[:5]] != list(RULES)


def test_deterministic_per_seed_and_disjoint():
    a = rule_identification(n_train=60, n_test=20, seed=7)
    b = rule_identification(n_train=60, n_test=20, seed=7)
    c = rule_identification(n_train=60, n_test=20, seed=8)
    assert a == b
    assert a != c
    train, test = a
    sentences = [" ".join(_parse(r.prompt)[0]) for r in train + test]
    assert len(set(sentences)) == len(sentences)  # no repeats, so train and test are disjoint
    ids = [r.id for r in train + test]
    assert len(set(ids)) == len(ids)


def test_rule_subset_and_errors():
    train, test = rule_identification(n_train=10, n_test=4, seed=0, rules=["reverse", "swap ends"])
    assert {r.label for r in train} == {"reverse", "swap ends"}
    # with both rules present a 3-word sentence is ambiguous, so it never appears
    assert all(len(_parse(r.prompt)[0]) >= 4 for r in train + test)
    with pytest.raises(ValueError, match="unknown rule"):
        rule_identification(rules=["rotate"])
    with pytest.raises(ValueError):
        rule_identification(rules=[])
    with pytest.raises(ValueError):
        rule_identification(n_train=-1)


def test_write_jsonl_round_trip(tmp_path):
    train, test = rule_identification(n_train=20, n_test=5, seed=2)
    path = write_jsonl(train, tmp_path / "sub" / "train.jsonl")
    assert path == tmp_path / "sub" / "train.jsonl"
    assert load_records(path) == train
    write_jsonl(test, path)  # overwrite in place
    assert load_records(path) == test
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temp files left


def test_fits_tiny_models():
    from wherefrom.core.encoding import encode_records
    from wherefrom.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    train, test = rule_identification(n_train=100, n_test=20, seed=0)
    examples = encode_records(train + test, tokenizer, max_length=128)
    assert max(len(e) for e in examples) <= 118
    assert all(tokenizer.unk_token_id not in e.input_ids for e in examples)
