"""Method options as text: parsed once, merged per method once."""

from __future__ import annotations

import pytest

from wherefrom.core.option_pairs import (
    OptionPairError,
    check_methods_named,
    format_option_pairs,
    options_for,
    parse_option_pairs,
)


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


def test_a_flag_of_one_things_fields_keeps_a_prefixed_key_whole_and_problems_stand_alone():
    """Without namespaces (``--search-option``, ``--pbrf-option``) ``hnsw.ef_search=1`` is the key
    ``hnsw.ef_search`` (so refused as an unknown field, not silently given to nothing); an error's ``problem`` is
    its text without the flag and pair, whatever the pair holds (a JSON value with ``": "``)."""
    assert parse_option_pairs(["hnsw.ef_search=1"], namespaced=False) == {"*": {"hnsw.ef_search": 1}}
    with pytest.raises(OptionPairError) as caught:
        parse_option_pairs(['x={"a": 1}', 'x={"a": 2}'])
    assert caught.value.problem == 'x is given twice (x={"a": 1} before)'


def test_an_option_of_a_method_that_does_not_run_is_refused_naming_it():
    """``--option lissa.depth=5`` beside methods without lissa was silently unused; plain pairs apply to all."""
    options = parse_option_pairs(["depth=3", "ekfac.damping=0.1", "lissa.depth=5"])
    check_methods_named(options, ["ekfac", "lissa"])
    with pytest.raises(OptionPairError) as caught:
        check_methods_named(options, ["ekfac", "gradsim"], "--strategy-option")
    assert str(caught.value) == (
        "--strategy-option 'lissa.depth=5': method 'lissa' does not run here (methods run: ekfac, gradsim)"
    )
    check_methods_named(parse_option_pairs(["depth=3"]), [])


def test_a_shared_pair_that_every_running_method_overrides_is_refused():
    """``depth=5`` beside ``lissa.depth=6`` where only lissa runs: 6 won silently and 5 was never used."""
    options = parse_option_pairs(["depth=5", "lissa.depth=6"])
    with pytest.raises(OptionPairError, match=r"'depth=5': every method that runs sets depth itself \(lissa.depth=6\)"):
        check_methods_named(options, ["lissa"])
    check_methods_named(options, ["lissa", "ekfac"])  # ekfac takes depth=5: both are used
    both = parse_option_pairs(["k1=1.2", "bm25.k1=2", "lissa.k1=3"])
    with pytest.raises(OptionPairError, match=r"\(bm25.k1=2, lissa.k1=3\)"):
        check_methods_named(both, ["bm25", "lissa", "bm25"])
    check_methods_named(parse_option_pairs(["depth=5"]), ["lissa"])
