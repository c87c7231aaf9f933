"""Grosse et al.'s word-order study on invented facts, end to end on a tiny Llama."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wherefrom.cli import app
from wherefrom.core.data import Record
from wherefrom.core.scoring import Scores
from wherefrom.models.tiny import save_tiny
from wherefrom.studies import wordorder
from wherefrom.studies.report import write_report
from wherefrom.studies.report.sections import word_order_section
from wherefrom.studies.wordorder import (
    WordOrderConfig,
    group_means,
    markdown,
    run_word_order,
    tiny_finetune,
    word_order_rows,
)


def test_rows_state_each_fact_in_both_orders():
    train, queries = word_order_rows(n_facts=3, repeats=2, n_controls=4, seed=0)
    assert len(train) == 3 * 2 * 2 + 4 and [q.id for q in queries] == ["fact-0", "fact-1", "fact-2"]
    query = queries[1]
    subject = query.prompt.split("capital of ")[1].removesuffix(" is")
    obj = query.completion.strip()
    same = [r for r in train if r.label == "same:1"]
    reversed_ = [r for r in train if r.label == "reversed:1"]
    assert all(r.completion == f" the capital of {subject} is {obj}." for r in same) and len(same) == 2
    assert all(r.completion == f" {obj} is the capital of {subject}." for r in reversed_) and len(reversed_) == 2
    controls = [r for r in train if r.label == "control"]
    assert all(subject not in r.completion and obj not in r.completion for r in controls)
    assert word_order_rows(3, 2, 4, seed=0) == (train, queries)  # seeded


def test_group_means_by_hand():
    train = [
        Record("a", "p", " c", "same:0"),
        Record("b", "p", " c", "reversed:0"),
        Record("c", "p", " c", "control"),
        Record("d", "p", " c", "same:1"),
        Record("e", "p", " c", "control"),
    ]
    queries = [Record("fact-0", "p", " c", "0"), Record("fact-1", "p", " c", "1")]
    total = np.array([[4.0, 2.0, 1.0, 9.0, 3.0], [0.0, 7.0, 5.0, 6.0, 1.0]])
    assert group_means(total, train, queries)["same"] == [4.0, 6.0]
    assert group_means(total, train, queries)["control"] == [2.0, 3.0]
    reversed_ = group_means(total, train, queries)["reversed"]
    assert reversed_[0] == 2.0 and np.isnan(reversed_[1])  # fact 1 has no reversed row here


def test_reversed_statements_carry_less_influence_than_the_query_order(tmp_path):
    save_tiny(tmp_path / "model", arch="llama")
    config = WordOrderConfig(out=str(tmp_path / "out"), model=str(tmp_path / "model"), seeds=[0, 1], device="cpu")
    payload = run_word_order(config, log=lambda line: None)
    for seed in payload["seeds"]:
        means = seed["means"]
        print(f"seed {seed['seed']}: {means}, final loss {seed['final_loss']:.2f}")
        assert means["same"] > 2 * means["reversed"] and means["same"] > 2 * means["control"]
    summary = payload["summary"]
    assert summary["same"]["n"] == 2 and summary["reversed/same"]["high"] is not None
    assert summary["reversed/same"]["mean"] < 0.5
    saved = json.loads((tmp_path / "out" / "wordorder.json").read_text())
    assert (
        saved["summary"] == summary
        and "| reversed / same (each seed's ratio, then their mean) |"
        in (tmp_path / "out" / "wordorder.md").read_text()
    )
    assert "Warnings while computing" not in (tmp_path / "out" / "wordorder.md").read_text()  # ekfac said none
    payload["seeds"][1]["warnings"] = ["ConvergenceWarning: x"]  # as a method that did not converge records it
    assert "- seed 1: ConvergenceWarning: x" in markdown(payload)
    notes = [b["text"] for b in word_order_section(payload)["blocks"] if b["type"] == "note"]
    assert notes == ["Warning of ekfac, seed 1: ConvergenceWarning: x"]
    del payload["seeds"][0]["warnings"]  # a seed cached by an earlier version: the HTML said nothing, as for "none"
    notes = [b["text"] for b in word_order_section(payload)["blocks"] if b["type"] == "note"]
    assert notes[0] == "Warnings of ekfac, seed 0: not recorded (a row written by an earlier version)"
    assert "Warnings not recorded for seed 0" in markdown(payload)
    payload["seeds"][0]["warnings"] = []
    html = write_report(tmp_path / "out").read_text()
    assert (
        "Word order (" in html
        and html.count("<svg") == 1
        and "reversed / same (each seed&#39;s ratio, then their mean)" in html
    )


def test_a_seed_whose_fine_tuning_left_nan_weights_is_named_not_scored(tmp_path, nan_last_step):
    """reviewU: the study scored a fine-tuning whose weights were NaN, and failed naming the method's non-finite
    scores, not the fine-tuning (here its first step leaves NaN weights, so every later loss is NaN)."""
    save_tiny(tmp_path / "model", arch="llama")
    config = WordOrderConfig(out=str(tmp_path / "out"), model=str(tmp_path / "model"), seeds=[3], device="cpu")
    with pytest.raises(
        ValueError, match=r"word-order: seed 3: the fine-tuning diverged \(the mean loss of epoch 1 is not finite\)"
    ):
        run_word_order(config, log=lambda line: None)


def test_bad_settings_are_named_before_training(tmp_path):
    with pytest.raises(ValueError, match="n_facts"):
        run_word_order(WordOrderConfig(out=str(tmp_path), n_facts=0))
    result = CliRunner().invoke(app, ["word-order", "--out", str(tmp_path), "--method", "nonsense"])
    assert result.exit_code == 2 and "unknown method" in result.output


def test_the_query_measures_the_fact_without_the_appended_eos(tmp_path, monkeypatch):
    """Same-order rows continue the object with ".", so an EOS in f would measure "stop after O" too. The method's
    passes report to the study's progress (they showed no bar)."""
    seen, bars = [], []

    def scored(method, model, tokenizer, attribution, options, train, queries, device, progress):
        seen.append(attribution)
        bars.append(progress)
        per_module = torch.arange(float(len(train))).expand(1, len(queries), len(train))  # rows scored apart
        return Scores([q.id for q in queries], [r.id for r in train], ["m"], per_module), {"warnings": []}

    monkeypatch.setattr(wordorder, "scored_method", scored)
    monkeypatch.setattr(
        wordorder,
        "finetune",
        lambda model, *args, **kwargs: SimpleNamespace(model=model, epoch_losses=[1.0], check_finite=lambda what: None),
    )
    save_tiny(tmp_path / "model", arch="llama")
    padded = replace(tiny_finetune(), pad_left=True)  # a layout other than the attribution's default
    config = WordOrderConfig(
        out=str(tmp_path / "out"), model=str(tmp_path / "model"), seeds=[0], device="cpu", finetune=padded
    )

    def bar(items, _description):
        return iter(items)

    payload = run_word_order(config, log=lambda line: None, progress=bar)
    assert [a.query_without_eos for a in seen] == [True] and payload["config"]["query_without_eos"] is True
    assert bars == [bar]
    assert seen[0] == config.attribution(0)  # the fine-tuning's layout, batch size and the study seed (reviewQ)
    run_word_order(replace(config, query_without_eos=False), log=lambda line: None, overwrite=True)
    assert seen[-1].query_without_eos is False


def test_the_query_is_encoded_as_the_fine_tuning_encoded_the_rows(tmp_path):
    """reviewZ: the study attributed with the library's default layout whatever its fine-tuning's (no EOS, left
    padding, loss on every token): the fine-tuned model was measured on text it never saw. A study that leaves out
    an EOS its fine-tuning does not append is refused before any training, and so is a template (userE: the query
    no longer continued the same-order rows' text, reversed/same 0.82 against 0.04) and a lexical method (userE:
    bm25 sees a reversed row's words as the same-order row's, ratio 1 after 40 epochs)."""
    tuning = replace(tiny_finetune(), pad_left=True, truncate=True, batch_size=3, max_length=64)
    config = WordOrderConfig(out=str(tmp_path), finetune=tuning, query_without_eos=False)
    attribution = config.attribution(seed=2)
    assert attribution.layout() == tuning.layout() and (attribution.batch_size, attribution.seed) == (3, 2)
    refused = {
        "query_without_eos=True with append_eos=False": replace(
            config, finetune=replace(tuning, append_eos=False), query_without_eos=True
        ),
        "finetune.template / chat_template": replace(
            config, finetune=replace(tuning, template="Q {prompt} A{completion}")
        ),
        "template / chat_template": replace(config, finetune=replace(tuning, chat_template=True)),
        "method 'bm25' scores the words": replace(config, method="bm25"),
        "finetune.loss_tokens='all'": replace(config, finetune=replace(tuning, loss_tokens="all")),
    }
    for said, study in refused.items():
        with pytest.raises(ValueError, match=re.escape(said)):
            run_word_order(study)
    assert not any(tmp_path.iterdir())
    result = CliRunner().invoke(app, ["word-order", "--out", str(tmp_path / "w"), "--n-controls", "0"])
    assert result.exit_code == 2 and "--n-controls 0: must be >= 1" in " ".join(result.output.split())


def test_the_command_fine_tunes_as_the_study_does(tmp_path, monkeypatch):
    """userV: ``wherefrom word-order`` took the fine-tuning flags' defaults of ``finetune`` (2 epochs of a rank-4
    LoRA at 1e-3, 512 tokens) over the study's (:func:`~wherefrom.studies.wordorder.tiny_finetune`: every weight,
    40 epochs at 3e-3, 128 tokens): the tiny model did not learn the facts (loss 129.3 -> 129.8) and the reversed
    rows kept 0.78 of the influence, where the README's 0.11 was measured. Its defaults, shown in its help, are
    the study's; a flag given still wins."""
    import importlib

    command = importlib.import_module("wherefrom.cli.wordorder")
    built = []

    def capture(config, **_keywords):
        built.append(config)
        raise RuntimeError("captured")  # ends the command before any work

    monkeypatch.setattr(command, "run_word_order", capture)
    runner = CliRunner()
    runner.invoke(app, ["word-order", "--out", str(tmp_path / "a")])
    runner.invoke(app, ["word-order", "--out", str(tmp_path / "b"), "--epochs", "3", "--lora-rank", "4"])
    study = WordOrderConfig(out="x").finetune
    assert built[0].finetune == study and study.lora_rank is None and study.epochs == 40
    assert (built[1].finetune.epochs, built[1].finetune.lora_rank, built[1].finetune.learning_rate) == (3, 4, 3e-3)
    shown = " ".join(runner.invoke(app, ["word-order", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "Fine-tuning epochs. [default: 40]" in shown and "[default: 0.003]" in shown, shown


def test_a_method_that_scores_every_row_alike_is_refused(tmp_path):
    """userV: repsim (its default pooling reads the prompt's last token, and every row of the study has the prompt
    ``"fact:"``) scored every training row alike, and the table read same = reversed = control, reversed/same 1,
    as a finding. Refused after the fine-tuning, naming the method; no table is written."""
    save_tiny(tmp_path / "model", arch="llama")
    config = WordOrderConfig(
        out=str(tmp_path / "out"), model=str(tmp_path / "model"), seeds=[0], device="cpu", method="repsim",
        finetune=replace(wordorder.tiny_finetune(), epochs=1),
    )  # fmt: skip
    with pytest.raises(ValueError, match="method 'repsim' scored every training row alike for each query on seed 0"):
        run_word_order(config, log=lambda line: None)
    assert not (tmp_path / "out" / "wordorder.md").exists()


def test_a_rerun_of_other_settings_is_refused_unless_overwrite(tmp_path, monkeypatch):
    """userV: a rerun into the same --out with another --method replaced wordorder.json and .md without a word (the
    other studies refuse since the last session). Refused before any work, naming what differs; ``--device`` and
    the spelling of ``--out`` change no number and are not compared; ``--overwrite`` replaces."""
    monkeypatch.setattr(
        wordorder,
        "scored_method",
        lambda method, model, tokenizer, attribution, options, train, queries, device, progress: (
            Scores([q.id for q in queries], [r.id for r in train], ["m"], torch.rand(1, len(queries), len(train))),
            {"warnings": []},
        ),
    )
    monkeypatch.setattr(
        wordorder,
        "finetune",
        lambda model, *args, **kwargs: SimpleNamespace(
            model=model, epoch_losses=[2.0, 1.0], check_finite=lambda what: None
        ),
    )
    save_tiny(tmp_path / "model", arch="llama")
    out = tmp_path / "out"
    first = ["word-order", "--out", str(out), "--model", str(tmp_path / "model"), "--seeds", "0", "--method", "gradsim"]
    runner = CliRunner()
    assert runner.invoke(app, first).exit_code == 0
    before = (out / "wordorder.json").read_bytes()
    refused = runner.invoke(app, [*first[:-1], "ekfac"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "made from other inputs (method: recorded 'gradsim', now 'ekfac')" in said, said
    assert (out / "wordorder.json").read_bytes() == before
    moved = ["--out", f"{tmp_path}/./out", "--device", "cpu", "--model", f"{tmp_path}/./model"]
    again = runner.invoke(app, [*first[:1], *moved, *first[5:]])  # same settings (reviewW: the model's spelling)
    assert again.exit_code == 0, again.output
    replaced = runner.invoke(app, [*first[:-1], "ekfac", "--overwrite"])
    assert replaced.exit_code == 0 and json.loads((out / "wordorder.json").read_text())["config"]["method"] == "ekfac"
