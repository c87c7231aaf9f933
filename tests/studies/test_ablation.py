"""Presets (``bench --preset``) and ``wherefrom ablate`` on a tiny Llama."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import typer

from tests.cli.conftest import invoke
from wherefrom.core.encoding import REFERENCE_TEMPLATE
from wherefrom.core.option_pairs import options_for
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.ablation import markdown as ablation_markdown
from wherefrom.studies.presets import PRESETS, SWITCHES, resolve, switch_keys, switched, switches_between


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("ablate") / "model", arch="llama"))


def test_presets_share_keys_and_resolve_explicit_settings_over_them():
    assert PRESETS["reference-study"].keys() == PRESETS["wherefrom"].keys()
    keys = {k for group in SWITCHES.values() for k in group}
    assert keys == {k for k in PRESETS["wherefrom"] if k != "method_options"} | {"method_options.lissa"}
    settings = resolve(
        "reference-study", {"epochs": 1, "method_options": {"lissa": {"depth": 5}, "repsim": {"layer": 2}}}
    )
    assert settings["epochs"] == 1 and settings["template"] == REFERENCE_TEMPLATE and settings["lora_alpha"] == 32
    assert settings["method_options"] == {
        "lissa": {"damping_sign": "reference", "depth": 5, "scale": 1e-3 / 127**2, "curvature": "fisher"},
        "repsim": {"layer": 2},
    }
    assert PRESETS["reference-study"]["epochs"] == 10  # resolving copies, never edits the preset
    flipped = switched(settings, "wherefrom", "lissa", {"method_options": {"lissa": {"depth": 5}}})
    assert flipped["method_options"]["lissa"] == {"depth": 5} and flipped["template"] == REFERENCE_TEMPLATE
    assert switched(settings, "wherefrom", "finetune", {"epochs": 1})["epochs"] == 1  # a fixed setting holds
    assert switches_between("reference-study", "wherefrom", {}) == list(SWITCHES)
    assert "lissa" not in switches_between("reference-study", "wherefrom", {}, methods=["gradsim"])
    # userE: a fisher run of methods none of which reads --fisher was run, identical to start (delta +0.000 everywhere)
    unread = switches_between("reference-study", "wherefrom", {}, methods=["gradsim", "bm25"])
    assert unread == ["template", "padded-loss", "finetune"]  # the fine-tuning's switches change every method's model
    assert "fisher" in switches_between("reference-study", "wherefrom", {}, methods=["gradsim", "ekfac"])
    # reviewQ: datainf presets the empirical Fisher over the bench's, so its fisher run changed nothing either
    assert "fisher" not in switches_between("reference-study", "wherefrom", {}, methods=["datainf", "gradsim"])
    # what a switch's run changes: a fixed setting is not among them (userW: ablate.md listed epochs under --epochs 3)
    finetune = list(SWITCHES["finetune"])
    assert switch_keys("reference-study", "wherefrom", "finetune", {}) == finetune
    assert switch_keys("reference-study", "wherefrom", "finetune", {"epochs": 3}) == finetune[:-1]
    assert switch_keys("reference-study", "wherefrom", "lissa", {}, methods=["gradsim"]) == []
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        resolve("nope", {})


def test_a_plain_option_overrides_the_presets_option_for_one_method():
    """``--option depth=5`` (every method) beats the preset's ``lissa.depth=3``, which as lissa's own entry would
    otherwise win; ``lissa.depth`` given too wins over both; the preset's other lissa options stay."""
    plain = resolve("reference-study", {"method_options": {"*": {"depth": 5}}})
    lissa = options_for(plain["method_options"], "lissa")
    assert lissa["depth"] == 5 and lissa["damping_sign"] == "reference"
    both = resolve("reference-study", {"method_options": {"*": {"depth": 5}, "lissa": {"depth": 7}}})
    assert options_for(both["method_options"], "lissa")["depth"] == 7
    fixed = {"method_options": {"*": {"depth": 5}}}
    flipped = switched(resolve("wherefrom", fixed), "reference-study", "lissa", fixed)
    assert options_for(flipped["method_options"], "lissa")["depth"] == 5  # a fixed plain option holds when switched
    assert PRESETS["reference-study"]["method_options"]["lissa"]["depth"] == 3  # the preset itself unchanged


def test_bench_preset_records_resolved_settings_and_flags_override(tmp_path, tiny_model):
    out = tmp_path / "bench"
    result = invoke(
        "bench", "--task", "rules", "--n-train", "12", "--n-test", "3", "--methods", "gradsim,lissa", "--model", tiny_model,
        "--device", "cpu", "--preset", "reference-study", "--epochs", "1", "--option", "lissa.depth=2", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "bench.json").read_text())["config"]
    assert config["preset"] == "reference-study" and config["epochs"] == 1  # the flag beats the preset's 10
    assert config["template"] == REFERENCE_TEMPLATE and config["append_eos"] is False and config["pad_left"] is True
    assert config["loss_tokens"] == "all" and config["max_length"] == 128 and config["fisher"] == "empirical"
    assert config["truncate"] is True
    assert (config["lora_alpha"], config["lora_dropout"], config["lr_schedule"]) == (32, 0.1, "linear")
    assert config["method_options"]["lissa"] == {
        "damping_sign": "reference",
        "depth": 2,
        "scale": 1e-3 / 127**2,
        "curvature": "fisher",
    }
    for method in ("gradsim", "lissa"):
        row = json.loads((out / "seed-0" / f"{method}.json").read_text())
        assert row["error"] is None and len(row["top1"]) == 3
    assert row["key"]["options"]["depth"] == 2  # lissa ran at the flag's depth, not the preset's 3
    # the record names what the user set, not defaults the preset overrode (e.g. --max-length 512), and
    # replays to the same resolved settings
    line = json.loads((out / "bench.json").read_text())["command"]
    assert "--preset reference-study" in line and "--epochs 1" in line and "--option lissa.depth=2" in line
    for flag in ("--max-length", "--learning-rate", "--loss-tokens", "--batch-size", "--fisher", "--lora-alpha"):
        assert flag not in line, line
    recorded = json.loads((out / "config.json").read_text())["replay"]["bench"]["arguments"]
    assert "max_length" not in recorded and recorded["epochs"] == 1 and recorded["preset"] == "reference-study"
    replayed = invoke("replay", out)
    assert replayed.exit_code == 0, replayed.output
    assert json.loads((out / "bench.json").read_text())["config"] == config
    bad = invoke("bench", "--task", "rules", "--preset", "nope", "--out", tmp_path / "x")
    assert (
        bad.exit_code == 2 and "--preset nope: unknown preset; choose one of reference-study, wherefrom" in bad.output
    )


def test_a_preset_record_of_the_first_version_replays_to_the_preset(tmp_path):
    """reviewW: a ``bench --preset`` record written on 1 December 2026 (fe1aeab to f8238df) named every setting,
    those at their default included, which the preset then decided. Replayed now, a default recorded there
    overrode the preset as a flag given does (``--fisher true``, ``--max-length 512``, ``--epochs 2``). A record
    naming every preset setting is replayed with those at their default left to the preset, as it ran."""
    import wherefrom.studies.bench as bench
    from tests.studies.replayed import config_of_line
    from wherefrom.cli.settings import SETTINGS
    from wherefrom.cli.studies import PRESET_SETTINGS

    out = tmp_path / "b"
    line = f"wherefrom bench --task rules --out {out} --preset reference-study --epochs 3"
    expected = config_of_line(line, bench, "run_bench")
    assert (expected["fisher"], expected["max_length"], expected["epochs"]) == ("empirical", 128, 3)
    arguments = {name: SETTINGS[name].default for name in PRESET_SETTINGS}
    arguments |= {"task": "rules", "out": str(out), "preset": "reference-study", "epochs": 3}
    out.mkdir()
    record = {"command": "bench", "arguments": arguments, "line": line, "cwd": ".", "folder": "."}
    (out / "config.json").write_text(json.dumps({"replay": {"bench": record}}))
    made = []

    def capture(config, command=None, **_keywords):
        made.append(config)
        raise RuntimeError("captured")  # ends the command before any work

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "run_bench", capture)
        invoke("replay", out)
    assert asdict(made[0]) == expected


def test_a_flag_given_at_its_default_overrides_the_preset(tmp_path):
    """userS: ``bench --preset reference-study --fisher true`` ran with the preset's empirical Fisher: a flag given
    at its default value was not told apart from one left out. A flag given overrides the preset, at its default
    too; the command line recorded names it, and so does a record replayed (the command called with keywords);
    ``ablate`` holds it in every run, so the ``fisher`` switch is left out."""
    import wherefrom.studies.ablation as ablation
    import wherefrom.studies.bench as bench
    from tests.studies.replayed import config_of_line
    from wherefrom.cli.app import COMMANDS

    made: list[tuple] = []
    records: list[dict] = []

    def capture(config, command=None, **_keywords):
        made.append((config, command))
        records.append(json.loads((Path(config.out) / "config.json").read_text())["replay"]["bench"]["arguments"])
        raise RuntimeError("captured")  # ends the command before any work (and takes the record away)

    preset = f"wherefrom bench --task rules --out {tmp_path / 'b'} --preset reference-study"
    plain = config_of_line(preset, bench, "run_bench")
    assert (plain["fisher"], plain["max_length"], plain["epochs"]) == ("empirical", 128, 10)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "run_bench", capture)
        invoke(*preset.split()[1:], "--fisher", "true", "--max-length", "512", "--epochs", "10")
        with pytest.raises(typer.Exit):  # replay calls the command with the recorded arguments; exit 2 at the capture
            COMMANDS["bench"](**records[0])
    (given, line), (replayed, _) = made
    assert (given.fisher, given.max_length, given.epochs) == ("true", 512, 10) and replayed == given
    assert "lora_target" not in records[0] and "learning_rate" not in records[0]  # left to the preset
    assert "--fisher true" in line and "--max-length 512" in line and "--epochs 10" in line, line
    assert "--learning-rate" not in line and "--loss-tokens" not in line, line  # left to the preset, as before
    assert asdict(given) == config_of_line(line, bench, "run_bench")
    ablate = f"wherefrom ablate --task rules --out {tmp_path / 'a'} --fisher true"
    config = ablation.AblationConfig(**config_of_line(ablate, ablation, "run_ablation"))
    assert config.fixed == {"fisher": "true"}  # not lora_targets=None: a flag not given (reviewW)
    assert [name for name, _ in ablation.ablation_runs(config)] == [
        *(n for n, _ in ablation.ablation_runs(ablation.AblationConfig(task="rules", out="x")) if n != "fisher")
    ]


def test_ablate_two_switches_on_tiny_model(tmp_path, tiny_model):
    """Fine-tuning and the padded loss fixed by flags (at non-default values), LiSSA not run: two switches
    remain (template, fisher). Each run's bench records its settings; runs that fine-tune alike share one
    fine-tuned model; the report gives paired changes with intervals over the two seeds and the short-rows
    counts."""
    out = tmp_path / "ablate"
    result = invoke(
        "ablate", "--task", "rules", "--from", "reference-study", "--to", "wherefrom", "--n-train", "12",
        "--n-test", "3", "--seeds", "0,1", "--methods", "gradsim,ekfac", "--model", tiny_model, "--device", "cpu",
        "--epochs", "1", "--learning-rate", "0.01", "--batch-size", "4", "--lora-alpha", "16",
        "--lora-dropout", "0.05", "--lr-schedule", "linear", "--pad-left", "--loss-tokens", "all",
        "--max-length", "128", "--truncate", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "ablate.json").read_text())
    assert report["order"] == ["start", "template", "fisher", "target"] and set(report["runs"]) == set(report["order"])
    assert report["sizes"] == {"n_train": 12, "n_test": 3}  # the rows used, as bench.json records them
    assert report["switches"] == {
        "start": [],
        "template": ["template", "append_eos"],
        "fisher": ["fisher"],
        "target": [],
    }
    configs = {run: json.loads((out / "runs" / run / "bench.json").read_text())["config"] for run in report["runs"]}
    assert configs["start"]["template"] == REFERENCE_TEMPLATE and configs["start"]["fisher"] == "empirical"
    assert configs["template"]["template"] is None and configs["template"]["append_eos"] is True
    assert configs["template"]["fisher"] == "empirical"
    assert configs["fisher"]["fisher"] == "true" and configs["fisher"]["template"] == REFERENCE_TEMPLATE
    assert configs["target"]["template"] is None and configs["target"]["fisher"] == "true"
    for config in configs.values():  # the fixed settings hold everywhere
        assert (config["epochs"], config["batch_size"], config["pad_left"], config["loss_tokens"]) == (
            1,
            4,
            True,
            "all",
        )
    assert len(list((out / "finetunes").iterdir())) == 2 * 2  # two distinct fine-tunings x two seeds
    for run in ("template", "fisher", "target"):
        for method in ("gradsim", "ekfac"):
            for metric in ("acc", "cover"):
                stat = report["changes"][run][method][metric]
                assert stat["n"] == 2 and -1 <= stat["low"] <= stat["mean"] <= stat["high"] <= 1
    line = report["command"]  # flags at non-default values hold in every run; the presets decide the rest
    assert "--pad-left" in line and "--loss-tokens all" in line and "--fisher" not in line and "--template" not in line
    short = report["short_rows"]["start"]["gradsim"]
    assert short["queries"] == 6 and 0 <= short["short_top1"] <= 6 and 1 <= short["most_frequent_top1"] <= 6
    text = (out / "ablate.md").read_text()
    assert text.startswith("# wherefrom ablate: rules (12 training rows, 3 queries), from reference-study to")
    assert "## Change against `start`" in text and "| fisher | ekfac |" in text and "top-1 is a short row" in text
    assert "Warnings while computing" not in text  # neither method said any
    report["runs"]["fisher"]["ekfac"]["warnings"] = {"1": ["ConvergenceWarning: x"]}  # as a bench row records one
    assert "- fisher: ekfac, seed 1: ConvergenceWarning: x" in ablation_markdown(report, "wherefrom ablate ...")
    report["runs"]["fisher"]["ekfac"]["errors"] = {"0": "RuntimeError: out of\nmemory"}  # its table: "–" alone
    assert (
        "Failed (each error in full):\n\n- fisher: ekfac, seed 0: RuntimeError: out of memory\n"
        in ablation_markdown(report, "wherefrom ablate ...")
    )
    shown = invoke("report", out)
    assert shown.exit_code == 0, shown.output
    html = (out / "report.html").read_text()
    assert "Run template" in html and "Change against the start run" in html and "fisher: ekfac" in html


def test_short_row_wins_counts_top1_of_the_shortest_share_per_seed():
    """Exact counts on a hand-made report: per seed the shortest ``share`` of rows (at least one) are short;
    failed rows and other methods are skipped; the most frequent winner is counted per seed."""
    from wherefrom.studies.ablation import short_row_wins

    lengths = {0: {f"r{i}": 10 * (i + 1) for i in range(20)}, 1: {f"r{i}": 10 * (20 - i) for i in range(20)}}
    report = {
        "rows": [
            {"method": "gradsim", "seed": 0, "error": None, "top1": ["r0", "r0", "r1", "r5"]},
            {"method": "gradsim", "seed": 1, "error": None, "top1": ["r19", "r18", "r0"]},
            {"method": "gradsim", "seed": 2, "error": "failed", "top1": []},
            {"method": "repsim", "seed": 0, "error": None, "top1": ["r0"]},
        ]
    }
    # 5%: one row a seed (r0 at seed 0, r19 at seed 1); 10%: two (r0, r1 / r19, r18)
    assert short_row_wins(report, "gradsim", lengths, 0.05) == {"queries": 7, "short_top1": 3, "most_frequent_top1": 3}
    assert short_row_wins(report, "gradsim", lengths, 0.10)["short_top1"] == 5
    assert short_row_wins(report, "repsim", lengths, 0.10) == {"queries": 1, "short_top1": 1, "most_frequent_top1": 1}


def test_paired_change_pairs_seeds_both_runs_scored():
    """``other - base`` per seed, over the asked seeds both runs scored without error (seed 2 failed in the
    base: left out), with the 95% t interval of the 2 differences; ``None`` when no seed pairs."""
    from wherefrom.studies.ablation import paired_change
    from wherefrom.studies.metrics import mean_ci

    def report(values, failed=()):
        return {
            "rows": [
                {"method": "ekfac", "seed": s, "error": "boom" if s in failed else None, "metrics": {"acc": v}}
                for s, v in values.items()
            ]
        }

    base, other = report({0: 0.5, 1: 0.2, 2: 0.9}, failed=(2,)), report({0: 0.7, 1: 0.6, 2: 0.1})
    change = paired_change(base, other, "ekfac", "acc", [0, 1, 2])
    _, low, high = mean_ci([0.2, 0.4])  # t with 1 degree of freedom: wider than [-1, 1], clipped
    assert change["n"] == 2 and change["mean"] == pytest.approx(0.3)
    assert (change["low"], change["high"]) == (pytest.approx(max(low, -1.0)), pytest.approx(min(high, 1.0)))
    assert paired_change(base, other, "ekfac", "acc", [2]) is None
    assert paired_change(base, other, "gradsim", "acc", [0, 1]) is None


def test_lora_target_holds_in_every_run_of_ablate_and_of_a_preset_bench(tmp_path):
    """``--lora-target`` (bench and groundtruth took it, ablate and a preset bench did not) reaches every bench run an
    ablation makes, and a bench under a preset, as an explicit setting the presets do not override."""
    import wherefrom.studies.ablation as ablation
    import wherefrom.studies.bench as bench
    from tests.studies.replayed import config_of_line

    line = f"wherefrom ablate --task rules --out {tmp_path / 'a'} --lora-target o_proj --lora-target q_proj"
    config = ablation.AblationConfig(**config_of_line(line, ablation, "run_ablation"))
    assert config.fixed["lora_targets"] == ["o_proj", "q_proj"]
    runs = ablation.ablation_runs(config)
    assert len(runs) > 2 and all(run.finetune_config(0).lora_targets == ["o_proj", "q_proj"] for _, run in runs)
    line = f"wherefrom bench --task rules --out {tmp_path / 'b'} --preset reference-study --lora-target o_proj"
    assert config_of_line(line, bench, "run_bench")["lora_targets"] == ["o_proj"]


def test_a_row_one_switch_cannot_take_is_refused_before_any_run(tmp_path, tiny_model):
    """userS: a row of 135 tokens fits the reference study's layout (truncated at 128) but not wherefrom's
    (no truncation, capped at the model's 128 positions): ``ablate`` fine-tuned every seed of the runs before
    ``padded-loss``, then refused it. Every run's layout is checked on every seed's rows before any run starts."""
    from wherefrom.core.data import DataError
    from wherefrom.studies.ablation import AblationConfig, run_ablation

    rows = [{"id": f"r{i}", "prompt": f"{i} w:", "completion": " x", "label": "x"} for i in range(6)]
    long = {"id": "long", "prompt": "a b:", "completion": " x" * 150, "label": "x"}
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*rows, long]))
    (tmp_path / "test.jsonl").write_text(json.dumps({**rows[0], "id": "q0"}) + "\n")
    task = f"path:{tmp_path / 'train.jsonl'}:{tmp_path / 'test.jsonl'}"
    config = AblationConfig(
        task=task, out=str(tmp_path / "ablate"), methods=["gradsim"], seeds=[0, 1], model=tiny_model, device="cpu"
    )
    with pytest.raises(DataError) as refused:
        run_ablation(config)
    said = str(refused.value)
    assert said.startswith("ablate run 'padded-loss' (reference-study + padded-loss of wherefrom), seed 0: ")
    assert "record 'long'" in said and "128 positions" in said
    assert not (tmp_path / "ablate" / "finetunes").exists() and not (tmp_path / "ablate" / "runs").exists()


def test_a_later_run_of_other_settings_is_refused_before_the_first_run(tmp_path, tiny_model):
    """reviewU: ``ablate`` checked each run's rows when that run came, so a rerun whose first runs were unchanged
    fine-tuned and scored them, then refused a later one. Every run's rows are checked before the first run."""
    from wherefrom.core.store import OutputExists
    from wherefrom.studies.ablation import AblationConfig, ablation_runs, run_ablation
    from wherefrom.studies.toolkit import store

    config = AblationConfig(
        task="rules", out=str(tmp_path / "ablate"), methods=["gradsim"], seeds=[0], n_train=8, n_test=2,
        model=tiny_model, device="cpu",
    )  # fmt: skip
    name = ablation_runs(config)[-1][0]
    row = tmp_path / "ablate" / "runs" / name / "seed-0" / "gradsim.json"
    row.parent.mkdir(parents=True)
    store(row, {"epochs": 1}, {"error": None})  # a finished row made with other settings
    with pytest.raises(OutputExists) as refused:
        run_ablation(config, overwrite=False)
    assert str(refused.value).startswith(f"earlier results would be overwritten: {row}, made from other inputs (")
    assert not (tmp_path / "ablate" / "finetunes").exists() and not (tmp_path / "ablate" / "runs" / "start").exists()
    # userW: the count named the first run's rows only ("and 5 more" where 36 would change): every run's together
    first = tmp_path / "ablate" / "runs" / "start" / "seed-0" / "gradsim.json"
    first.parent.mkdir(parents=True)
    store(first, {"epochs": 1}, {"error": None})
    with pytest.raises(OutputExists) as refused:
        run_ablation(config, overwrite=False)
    assert str(refused.value).startswith(f"earlier results would be overwritten: {first} and 1 more, made from")
