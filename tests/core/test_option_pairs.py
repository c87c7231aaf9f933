"""Method options as text: parsed once, merged per method once."""

from __future__ import annotations

import pytest

from wherefrom.core.option_pairs import format_option_pairs, options_for, parse_option_pairs


def test_pairs_parse_as_json_and_merge_per_method():
    pairs = ["depth=100", "lissa.depth=300", 'repsim.pooling="mean"', "lissa.name=plain text", "x=null"]
    parsed = parse_option_pairs(pairs)
    assert parsed == {
        "*": {"depth": 100, "x": None},
        "lissa": {"depth": 300, "name": "plain text"},
        "repsim": {"pooling": "mean"},
    }
    assert options_for(parsed, "lissa") == {"depth": 300, "x": None, "name": "plain text"}
    assert options_for(parsed, "ekfac") == {"depth": 100, "x": None}
    assert parse_option_pairs(format_option_pairs(parsed)) == parsed


@pytest.mark.parametrize("pair", ["depth", "lissa.=3", "=3"])
def test_a_pair_without_key_or_value_names_the_flag(pair):
    with pytest.raises(ValueError, match=r"--strategy-option .*expected key=value"):
        parse_option_pairs([pair], "--strategy-option")


def test_a_key_given_twice_is_refused_not_overridden():
    """Which of two values was meant is not known (the last one used to win silently); the same name for two
    methods is two keys."""
    with pytest.raises(
        ValueError, match=r"--search-option 'graph=angular': graph is given twice \(graph=\"ip\" before\)"
    ):
        parse_option_pairs(['graph="ip"', "graph=angular"], "--search-option")
    with pytest.raises(ValueError, match=r"lissa\.depth is given twice"):
        parse_option_pairs(["lissa.depth=3", "lissa.depth=3"])
    assert parse_option_pairs(["depth=3", "lissa.depth=4"]) == {"*": {"depth": 3}, "lissa": {"depth": 4}}
