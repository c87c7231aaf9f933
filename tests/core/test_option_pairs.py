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
