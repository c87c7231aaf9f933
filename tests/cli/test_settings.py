"""Settings declared once: one flag name, default and help everywhere; checks before any write; replay."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file

from tests.cli.conftest import invoke
from wherefrom.cli import app
from wherefrom.cli.app import COMMANDS, torch_threads
from wherefrom.cli.settings import ATTRIBUTION, SETTINGS, default_threads
from wherefrom.cli.wordorder import STUDY_FINETUNING
from wherefrom.core.data import Record
from wherefrom.core.scoring import save_scores
from wherefrom.core.vectors import VectorStoreWriter
from wherefrom.engine.api import AttributionConfig
from wherefrom.engine.run import Run
from wherefrom.models.finetune import FinetuneConfig
from wherefrom.models.tiny import save_tiny
from wherefrom.studies.analyses.ihvp import IhvpSettings
from wherefrom.studies.diagnose import diagnose
from wherefrom.studies.generated import write_jsonl
from wherefrom.studies.groundtruth.build import GroundTruthConfig
from wherefrom.studies.groundtruth.tune import tune
from wherefrom.studies.wordorder import WordOrderConfig


def fit_args(root, run, *extra):
    return [
        "fit",
        "--train",
        root / "train.jsonl",
        "--model",
        root / "model",
        "--run",
        run,
        "--max-length",
        "128",
        *extra,
    ]


OWN_DEFAULTS = {"word-order": STUDY_FINETUNING}
"""The commands whose defaults of shared settings are their own: word-order fine-tunes as its study does."""


def test_every_flag_has_one_name_default_and_help_across_commands():
    seen: dict[str, tuple] = {}
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        flags = {opt for param in cmd.params for opt in param.opts}
        assert "--threads" in flags, f"{name} has no --threads"
        for param in cmd.params:
            if param.name == "help":
                continue
            key = param.opts[0]
            default = param.default
            if param.name in OWN_DEFAULTS.get(name, {}):  # the command's own (command(defaults=)), shown in its help
                assert default == OWN_DEFAULTS[name][param.name], (name, key)
                default = SETTINGS[param.name].default
            now = (default, getattr(param, "help", None), param.required)
            assert seen.setdefault(key, now) == now, f"{key} differs in {name}: {now} vs {seen[key]}"
            assert SETTINGS[param.name].argument or SETTINGS[param.name].flag == key
    assert seen["--max-length"][0] == 512 and seen["--top-k"][0] == 10
    for name in ("fit", "attribute", "diagnose", "bench", "evaluate", "analyze"):
        flags = {opt for param in group.commands[name].params for opt in param.opts}
        assert {"--damping", "--damping-factor"} <= flags, name
    assert set(ATTRIBUTION) <= set(SETTINGS)


def test_flag_defaults_are_those_of_the_configuration_fields_they_set():
    """A flag's default is the default of the configuration field or keyword of its name, read from there (declared
    once; ``max_length`` was 256 for Python fine-tuning, 512 on the command line: one now)."""
    sources = {
        AttributionConfig: {},
        FinetuneConfig: {},
        GroundTruthConfig: {"subsets": "n_subsets"},
        IhvpSettings: {},
        WordOrderConfig: {"query_without_eos": None, "method": None},  # the study's own; word-order has no such flags
    }
    compared = set()
    for config, renamed in sources.items():
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
        for name, setting in SETTINGS.items():
            field_name = renamed.get(name, name)
            if field_name in defaults:
                assert setting.default == defaults[field_name], f"--{name}: {setting.default!r} vs {config.__name__}"
                compared.add(name)
    for function in (Run.build_index, VectorStoreWriter, save_scores, diagnose, tune):
        for name, parameter in inspect.signature(function).parameters.items():
            if name in SETTINGS and parameter.default is not inspect.Parameter.empty:
                assert SETTINGS[name].default == parameter.default, f"--{name} vs {function.__qualname__}"
                compared.add(name)
    chosen = {"strategy", "fisher", "batch_size", "epochs", "subsets", "shard_size", "dtype", "precondition", "top_k"}
    assert chosen | {"exact_blocks", "split_seed", "selection_share"} <= compared
    assert "max_length" in compared


def test_threads_default_and_restore():
    cores = len(__import__("os").sched_getaffinity(0))
    assert 1 <= default_threads() <= cores
    before = torch.get_num_threads()
    with torch_threads(1) as chosen:
        assert chosen == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def rows_args(root):
    """``attribute``'s training and query rows in the workspace."""
    return ("--train", root / "train.jsonl", "--queries", root / "train.jsonl")


UNRUN = ("--methods", "ekfac", "--option", "lissa.depth=3")
"""A method list and an option of a method not in it."""

CURVATURE_OFF = ("--option", "logra.curvature=false")
"""logra without its projected curvature: its Fisher is unread."""

TRAK_OFF = ("--option", "curvature=false")
"""trak, a command's one method, without its projected curvature."""


def invalid_cases(root, out):
    """(arguments, words the message must hold) for each invalid argument; ``out`` must stay absent. Makes
    ``root/listed`` (a ``config.json`` holding a list) and ``root/tuned`` (a fine-tuning's output folder: its
    weights in ``model/``, its adapter in ``adapter/``) and ``root/lora-run`` (a LoRA fine-tuning's: ``adapter/`` alone)."""
    listed, tuned, lora_run = root / "listed", root / "tuned", root / "lora-run"
    (lora_run / "adapter").mkdir(parents=True, exist_ok=True)
    (lora_run / "adapter" / "adapter_config.json").write_text("{}")
    listed.mkdir(exist_ok=True)
    (listed / "config.json").write_text("[1, 2]")
    for inner, marker in (("model", "config.json"), ("adapter", "adapter_config.json")):
        (tuned / inner).mkdir(parents=True, exist_ok=True)
        (tuned / inner / marker).write_text("{}")

    def preset_bench(preset: str, *more: str) -> list:
        return ["bench", "--task", "rules", "--out", out, "--preset", preset, *more]

    cases = [
        (fit_args(root, out, "--include", "["), ["--include [", "invalid regular expression"]),
        (fit_args(root, out, "--batch-size", "0"), ["--batch-size 0", ">= 1"]),
        (fit_args(root, out, "--fisher", "exact"), ["--fisher exact", "true, empirical"]),
        (fit_args(root, out, "--reduction", "max"), ["--reduction max", "sum, mean"]),
        (fit_args(root, out, "--strategy", "nope"), ["--strategy nope", "ekfac"]),
        (fit_args(root, out, "--strategy-option", "rank"), ["--strategy-option", "key=value"]),
        # an option of a method that does not run was silently unused
        (
            fit_args(root, out, "--strategy", "ekfac", "--strategy-option", "lissa.depth=3"),
            ["--strategy-option 'lissa.depth=3'", "method 'lissa' does not run here (methods run: ekfac)"],
        ),
        (fit_args(root, out, "--method", "trak", "--option", "logra.dim=8"), ["'logra.dim=8'", "run: trak)"]),
        # a setting the method does not read was recorded, changed no score, and refused a later run without it
        (
            fit_args(root, out, "--method", "bm25", "--damping", "0.5"),
            ["'bm25' does not read --damping 0.5, --max-length 128"],
        ),
        (
            fit_args(root, out, "--method", "logra", "--strategy", "kfac", "--query-rank", "2"),
            ["method 'logra' does not read --strategy kfac, --query-rank 2", "own strategy is --option strategy="],
        ),
        (fit_args(root, out, "--method", "gradsim", "--damping-factor", "2"), ["not read --damping-factor 2.0"]),
        # curvature=false skips the projected Fisher: its kind was recorded and changed no score
        (
            fit_args(root, out, "--method", "logra", "--option", "curvature=false", "--fisher", "empirical"),
            ["method 'logra' does not read --fisher empirical: leave it out"],
        ),
        (
            [*fit_args(root, out, "--method", "trak", "--fisher", "empirical"), "--option", "curvature=false"],
            ["method 'trak' does not read --fisher empirical"],
        ),
        (
            fit_args(root, out, "--method", "logra", "--option", "curvature=false", "--option", "strategy=kfac"),
            ["strategy='kfac' with curvature=False", "set curvature=True"],
        ),
        (
            fit_args(root, out, "--method", "trak", "--option", "curvature=false", "--option", "fisher=empirical"),
            ["method 'trak': fisher='empirical' with curvature=False"],
        ),
        (
            [
                "attribute",
                "--method",
                "trak",
                *rows_args(root),
                "--out",
                out,
                *TRAK_OFF,
                "--option",
                "fisher=empirical",
            ],
            ["method 'trak': fisher='empirical' with curvature=False"],
        ),
        (fit_args(root, out, "--strategy", "identity", "--fisher", "empirical"), ["strategy 'identity' does not"]),
        (fit_args(root, out, "--method", "repsim", "--include", "h.1", "--seed", "3"), ["--include h.1, --seed 3"]),
        (
            fit_args(root, out, "--method", "kfac", "--strategy", "diagonal"),
            ["--strategy diagonal: method 'kfac' is influence with the 'kfac' strategy", "--method diagonal"],
        ),
        (
            ["attribute", "--method", "bm25", *rows_args(root), "--out", out, "--batch-size", "2"],
            ["method 'bm25' does not read --batch-size 2: leave it out"],
        ),
        (  # a layout flag fit and attribute now take, by its command-line name (the field is append_eos)
            ["attribute", "--method", "bm25", *rows_args(root), "--out", out, "--no-eos"],
            ["method 'bm25' does not read --no-eos: leave it out"],
        ),
        (
            ["bench", "--task", "rules", "--out", out, "--methods", "ekfac,gradsim", "--option", "lissa.depth=3"],
            ["--option 'lissa.depth=3'", "method 'lissa' does not run here (methods run: ekfac, gradsim)"],
        ),
        (
            ["bench", "--task", "rules", "--out", out, "--preset", "wherefrom", "--option", "nope.x=1"],
            ["--option 'nope.x=1'", "method 'nope' does not run here"],
        ),
        (["ablate", "--task", "rules", "--out", out, "--option", "lissa.depth=3"], ["method 'lissa' does not run"]),
        # a curvature setting that none of a study's methods reads was recorded in its settings and keys (userX)
        # under a preset a flag given at its default value overrides it, so it counts (reviewX)
        (
            preset_bench("reference-study", "--fisher", "true", "--methods", "bm25,repsim"),
            ["none of the methods bm25, repsim reads --fisher true"],
        ),
        (
            ["bench", "--task", "rules", "--out", out, "--methods", "logra", "--fisher", "empirical", *CURVATURE_OFF],
            ["method 'logra' does not read --fisher empirical: leave it out"],
        ),
        (
            [
                "ablate",
                "--task",
                "rules",
                "--out",
                out,
                "--methods",
                "logra",
                *CURVATURE_OFF,
                "--option",
                "logra.strategy=kfac",
            ],
            ["method 'logra': strategy='kfac' with curvature=False"],
        ),
        (
            ["ablate", "--task", "rules", "--out", out, "--methods", "repsim,gradsim", "--damping-factor", "0.5"],
            ["none of the methods repsim, gradsim reads --damping-factor 0.5: leave it out"],
        ),
        (
            ["diagnose", "--train", root / "train.jsonl", "--queries", root / "train.jsonl", "--out", out, *UNRUN],
            ["method 'lissa' does not run here (methods run: ekfac)"],
        ),
        (["fit", "--train", root / "nope.jsonl", "--run", out], ["--train", "nope.jsonl", "no such file"]),
        (["query", "x", "y", "--run", out, "--top-k", "-1"], ["--top-k -1", ">= 1"]),
        (["query", "x", "y", "--run", out, "--by-module", "-1"], ["--by-module -1", ">= 0"]),
        (["bench", "--task", "rules", "--out", out, "--seeds", "a,b"], ["--seeds a,b", "integers"]),
        # a repeated seed is one run counted twice (word-order reported n 2 and an interval of zero width)
        (["word-order", "--out", out, "--seeds", "0,0"], ["--seeds 0,0", "seed(s) [0] repeated"]),
        (["ablate", "--task", "rules", "--out", out, "--seeds", "1,2,1"], ["--seeds 1,2,1", "seed(s) [1] repeated"]),
        # an integer beyond int64 was stored (index.json), then a tensor of that size overflowed with a traceback
        (
            ["index", "--run", out, "--shard-size", "99999999999999999999"],
            ["--shard-size", "outside the 64-bit integers"],
        ),
        (["query", "x", "y", "--run", out, "--top-k", str(2**63)], ["--top-k 9223372036854775808", "64-bit"]),
        (["bench", "--task", "rules", "--out", out, "--seeds", "0,99999999999999999999"], ["--seeds", "64-bit"]),
        (
            ["bench", "--task", "rules", "--out", out, "--methods", "lissa", "--option", "lissa.depth=1" + "0" * 30],
            ["depth", "outside the 64-bit integers"],
        ),
        # a negative seed was taken by --seeds though --seed refuses it (bench wrote seed--1/)
        (["bench", "--task", "rules", "--out", out, "--seeds", "0,-1"], ["--seeds 0,-1", "seed(s) [-1] negative"]),
        (["word-order", "--out", out, "--seeds", "-2"], ["--seeds -2", "seed(s) [-2] negative"]),
        (["bench", "--task", "rules", "--out", out, "--methods", "ekfac,nope"], ["--methods", "nope"]),
        (
            [
                "attribute",
                "--method",
                "gradsim",
                "--train",
                root / "train.jsonl",
                "--queries",
                root / "q.jsonl",
                "--out",
                out,
            ],
            ["--queries", "q.jsonl", "no such file"],
        ),
        (["evaluate", out], ["GROUNDTRUTH", "no such folder"]),  # userF: it said "not a ground-truth folder"
        # the flag, not the field (it said "selection_share must be in (0, 1)" once the ground truth was read)
        (
            ["tune", out, "--method", "ekfac", "--grid", "damping=1", "--selection-share", "1.5"],
            ["--selection-share 1.5"],
        ),
        (["replay", out], ["FOLDER", "no such file or folder"]),
        # a flag and an --option of one setting: the option won without a word
        (
            fit_args(root, out, "--method", "ekfac", "--fisher", "empirical", "--option", "fisher=true"),
            ["--fisher empirical and --option fisher=", "set the same setting: give it once"],
        ),
        (
            [
                "attribute",
                "--method",
                "ekfac",
                *rows_args(root),
                "--out",
                out,
                "--damping",
                "0.5",
                "--option",
                "damping=1",
            ],
            ["--damping 0.5 and --option damping=1"],
        ),
        # reviewQ: datainf presets the empirical Fisher over the configuration's: --fisher true changed nothing
        (
            preset_bench("wherefrom", "--methods", "datainf", "--fisher", "true"),
            ["method 'datainf' does not read --fisher true", "datainf's own fisher is --option fisher=..."],
        ),
        # userE: attribute took no --seed (EK-FAC's fitting labels); a method that draws nothing refuses it
        (
            ["attribute", "--method", "gradsim", *rows_args(root), "--out", out, "--seed", "1"],
            ["does not read --seed 1"],
        ),
        (["replay", root], ["FOLDER", "no config.json here"]),
        # userC: "'list' object has no attribute 'get'"
        (["replay", listed], ["FOLDER", "config.json does not hold a JSON object"]),
        # userC: "Model folder not found: nowhere" named no flag; userA: a fine-tuning's folder named where to look
        (["fit", "--train", root / "train.jsonl", "--model", root / "nowhere", "--run", out], ["--model", "not found"]),
        (
            ["fit", "--train", root / "train.jsonl", "--model", tuned, "--run", out],
            ["--model", "no config.json", f"a fine-tuning's output folder: give {tuned / 'model'}"],
        ),
        (
            ["fit", "--train", root / "train.jsonl", "--model", lora_run, "--run", out],
            ["--model", f"a LoRA fine-tuning's output folder: give its base model here and {lora_run / 'adapter'}"],
        ),
        (
            [*fit_args(root, out), "--adapter", tuned],
            ["--adapter", "no adapter_config.json", f"give {tuned / 'adapter'}"],
        ),
        # reviewY: refused by the fit after the model loaded, leaving the run's config behind
        (fit_args(root, out, "--strategy", "exact", "--reduction", "mean"), ["reduction='mean' is not supported"]),
        (fit_args(root, out, "--method", "lissa", "--reduction", "mean"), ["method 'lissa'", "reduction='mean'"]),
    ]
    if not torch.cuda.is_available():
        cases.append((fit_args(root, out, "--device", "cuda"), ["--device cuda", "not available", "available: cpu"]))
    cases.append((fit_args(root, out, "--device", "gpu"), ["--device gpu"]))
    return cases


def test_invalid_arguments_exit_2_name_the_flag_and_write_nothing(workspace, tmp_path):
    out = tmp_path / "out"
    for args, words in invalid_cases(workspace, out):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
        for word in words:
            assert word in result.output, (args, word, result.output)
        assert not out.exists(), args


@pytest.mark.parametrize(("method", "flags"), [("ekfac", ()), ("logra", ("--precondition", "none"))])
def test_index_names_a_row_the_model_cannot_take_before_its_first_shard(workspace, tmp_path, method, flags):
    """``index`` on a run whose training rows hold one over ``--max-length`` (its fit was refused for it) wrote the
    shards before that row and then stopped at it: at scale, most of a pass lost. Every row is tokenized first."""
    rows = tmp_path / "rows.jsonl"
    write_jsonl([Record("a", "x", " y"), Record("b", "x z", " y"), Record("c", "ab " * 10, " end")], rows)
    run = tmp_path / "run"
    fit = invoke("fit", "--train", rows, "--model", workspace / "model", "--run", run, "--method", method,
                 "--max-length", "16")  # fmt: skip
    assert fit.exit_code == 2 and "16" in fit.output
    index = invoke("index", "--run", run, "--shard-size", "1", *flags)
    assert index.exit_code == 2 and "rows.jsonl, line 3" in index.output, index.output
    assert not list(run.glob("index/shard-*")) and not (run / "index" / "index.json").exists()


def test_failed_fit_accepts_new_settings_and_a_finished_one_names_what_differs(workspace, tmp_path):
    long_rows = tmp_path / "long.jsonl"
    write_jsonl([Record("a", "ab " * 10, " end"), Record("b", "x", " y")], long_rows)
    run = tmp_path / "run"
    args = ["fit", "--train", long_rows, "--model", workspace / "model", "--run", run, "--strategy", "diagonal"]
    short = invoke(*args, "--max-length", "16")
    assert short.exit_code == 2 and "16" in short.output
    assert not (run / "factors").exists()
    fixed = invoke(*args, "--max-length", "64")
    assert fixed.exit_code == 0, fixed.output
    other = invoke(*args, "--max-length", "100")
    assert other.exit_code == 2 and "other settings" in other.output
    assert "attribution.max_length: recorded 64, now 100" in other.output


def test_replay_of_a_fit_recomputes_identical_factors(workspace, tmp_path):
    run = tmp_path / "run"
    assert invoke(*fit_args(workspace, run, "--strategy", "kfac", "--threads", "1")).exit_code == 0
    saved = json.loads((run / "config.json").read_text())
    record = saved["replay"]["fit"]
    assert record["command"] == "fit" and record["arguments"]["strategy"] == "kfac"
    assert record["line"].startswith("wherefrom fit --train <tmp>/") and str(tmp_path) not in record["line"]
    assert saved["attribution"]["strategy"] == "kfac"  # the run's own settings stay beside the record
    before = load_file(str(run / "factors" / "curvature.safetensors"))
    shutil.rmtree(run / "factors")
    del saved["replay"]["fit"]["cwd"], saved["replay"]["fit"]["position"]  # a record of an older version
    (run / "config.json").write_text(json.dumps(saved))
    replayed = invoke("replay", run)
    assert replayed.exit_code == 0, replayed.output
    after = load_file(str(run / "factors" / "curvature.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_replay_of_a_record_whose_directory_is_gone_runs_when_every_path_is_absolute(workspace, tmp_path):
    """userJ: a record whose directory (where it ran) is gone was refused even when every path it names is absolute,
    so that directory does not matter. It runs; one with a relative path is refused naming that path's flag."""
    run = tmp_path / "run"
    assert invoke(*fit_args(workspace, run, "--strategy", "kfac", "--threads", "1")).exit_code == 0
    saved = json.loads((run / "config.json").read_text())
    saved["replay"]["fit"]["cwd"] = "../gone"
    (run / "config.json").write_text(json.dumps(saved))
    before = (run / "factors" / "curvature.safetensors").read_bytes()
    shutil.rmtree(run / "factors")
    replayed = invoke("replay", run)
    assert replayed.exit_code == 0, replayed.output
    assert (run / "factors" / "curvature.safetensors").read_bytes() == before
    saved["replay"]["fit"]["arguments"]["train"] = "train.jsonl"
    (run / "config.json").write_text(json.dumps(saved))
    refused = invoke("replay", run)
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "which is gone, and its relative paths (--train) are relative to it" in said
    shutil.copytree(run, tmp_path / "copy")  # its absolute --run names the original: not replayed into it
    saved["replay"]["fit"]["arguments"]["train"] = str(workspace / "train.jsonl")
    (tmp_path / "copy" / "config.json").write_text(json.dumps(saved))
    refused = invoke("replay", tmp_path / "copy")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and f"which is gone, and none of its paths names {tmp_path / 'copy'}" in said


def test_replay_of_a_copied_or_moved_folder_writes_it_not_the_original(workspace, tmp_path, monkeypatch):
    """`replay COPY` of a run folder copied beside its original reran `fit --run runs/orig` (the recorded
    argument): it refitted the original and left the copy as it was, exit 0. The record keeps its folder as seen
    from where it ran, and a path argument at or under it names the replayed folder."""
    monkeypatch.chdir(tmp_path)
    assert invoke(*fit_args(workspace, "runs/orig", "--strategy", "kfac", "--threads", "1")).exit_code == 0
    factors = tmp_path / "runs" / "orig" / "factors" / "curvature.safetensors"
    made = (factors.read_bytes(), factors.stat().st_mtime_ns)
    for copy in ("copy", "moved"):
        if copy == "copy":
            shutil.copytree(tmp_path / "runs" / "orig", tmp_path / "runs" / copy)
        else:
            shutil.move(tmp_path / "runs" / "copy", tmp_path / "runs" / copy)
        shutil.rmtree(tmp_path / "runs" / copy / "factors")
        replayed = invoke("replay", tmp_path / "runs" / copy)
        assert replayed.exit_code == 0 and "was recorded as" in replayed.output, replayed.output
        assert (tmp_path / "runs" / copy / "factors" / "curvature.safetensors").read_bytes() == made[0]
        assert (factors.read_bytes(), factors.stat().st_mtime_ns) == made  # the original is not touched
        record = json.loads((tmp_path / "runs" / copy / "config.json").read_text())["replay"]["fit"]
        assert record["arguments"]["run"] == f"runs/{copy}" and record["folder"] == f"runs/{copy}"
    # a record whose folder none of its paths names (tune's default --out under its ground truth): refused
    tune = {"command": "tune", "arguments": {"groundtruth": "gt", "method": "ekfac", "out": None}}
    tune |= {"line": "wherefrom tune --groundtruth gt --method ekfac", "cwd": "..", "folder": "gt/tune-ekfac"}
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "config.json").write_text(json.dumps({"replay": {"tune": tune}}))
    refused = invoke("replay", tmp_path / "copied")
    assert refused.exit_code == 2 and "is named by none of its paths" in " ".join(refused.output.split())


def test_a_refused_command_keeps_the_record_of_the_one_that_made_the_folder(workspace, tmp_path, monkeypatch):
    """A refused ``fit --with-index`` (the index holds another --dtype) replaced the run's record, so ``replay``
    reran the refused command (exit 2). A command ending in an error puts back the record it replaced, or removes
    its own from a folder it was the first to record in; an interrupted one keeps it for replay to resume."""
    run = tmp_path / "run"
    args = [*fit_args(workspace, run, "--with-index", "--shard-size", "4", "--threads", "1")]
    assert invoke(*args, "--dtype", "float16").exit_code == 0

    def recorded(folder=run):
        return json.loads((folder / "config.json").read_text())["replay"]

    made = recorded()
    refused = invoke(*args, "--dtype", "float32")
    assert refused.exit_code == 2 and "dtype: recorded 'float16', now 'float32'" in refused.output
    assert recorded() == made
    replayed = invoke("replay", run)
    assert replayed.exit_code == 0, replayed.output

    fresh = tmp_path / "fresh"  # refused after the record was written: nothing left to replay
    long_rows = tmp_path / "long.jsonl"
    write_jsonl([Record("a", "ab " * 10, " end"), Record("b", "x", " y")], long_rows)
    short = invoke("fit", "--train", long_rows, "--model", workspace / "model", "--run", fresh, "--max-length", "16")
    assert short.exit_code == 2 and "fit" not in recorded(fresh)

    from wherefrom.engine.run import Run

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "fit", interrupted)
    other = tmp_path / "other"
    invoke(*fit_args(workspace, other, "--threads", "1"))
    assert recorded(other)["fit"]["arguments"]["run"] == str(other)


def test_a_failed_rerun_keeps_the_record_and_a_deleted_folder_stays_deleted(workspace, tmp_path, monkeypatch):
    """(code review) `attribute` rewrote its config.json whole before recording itself, so a failed rerun found no
    earlier record and removed its own: the folder had nothing to replay; and a folder deleted while a command ran
    was made again by the restore (its config.json, its lock)."""
    import wherefrom.core.scoring as scoring
    from wherefrom.engine.run import Run

    out = tmp_path / "attributed"
    args = ["attribute", "--method", "gradsim", "--train", workspace / "train.jsonl", "--queries"]
    args += [workspace / "queries.jsonl", "--model", workspace / "model", "--max-length", "128", "--out", out]
    assert invoke(*args).exit_code == 0
    made = json.loads((out / "config.json").read_text())["replay"]

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(scoring, "save_scores", full_disk)
        assert invoke(*args).exit_code == 2
    assert json.loads((out / "config.json").read_text())["replay"] == made
    assert invoke("replay", out).exit_code == 0

    run = tmp_path / "deleted"

    def deleted_underneath(self, *_args, **_kwargs):
        shutil.rmtree(run)
        raise ValueError("the folder went away")

    monkeypatch.setattr(Run, "fit", deleted_underneath)
    assert invoke(*fit_args(workspace, run, "--threads", "1")).exit_code == 2
    assert not run.exists()


def test_replay_of_a_bench_reproduces_its_rows(tmp_path):
    model = save_tiny(tmp_path / "model", arch="llama")
    out = tmp_path / "bench"
    args = [
        "bench",
        "--task",
        "rules",
        "--n-train",
        "8",
        "--n-test",
        "2",
        "--methods",
        "diagonal,bm25",
    ]  # diagonal reads --damping
    args += ["--epochs", "1", "--max-length", "128", "--model", model, "--device", "cpu", "--damping", "0.5"]
    first = invoke(*args, "--out", out)
    assert first.exit_code == 0, first.output
    report = json.loads((out / "bench.json").read_text())
    assert report["command"].startswith("wherefrom bench --task rules") and str(tmp_path) not in report["command"]
    assert report["config"]["damping"] == 0.5
    for item in out.iterdir():
        if item.name != "config.json":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    again = invoke("replay", out)
    assert again.exit_code == 0, again.output
    replayed = json.loads((out / "bench.json").read_text())

    def numbers(rows):  # what the numbers are, not how long they took
        return [{k: row[k] for k in ("seed", "method", "metrics", "error", "key")} for row in rows]

    assert numbers(replayed["rows"]) == numbers(report["rows"])
    assert replayed["command"] == report["command"]


def test_commands_are_callable_with_keywords_and_reject_unknown_settings(workspace):
    with pytest.raises(typer.Exit):
        COMMANDS["index"](run=workspace / "absent", colour="blue")


def test_replay_runs_each_command_where_and_in_the_order_it_first_ran(tmp_path, monkeypatch):
    """Relative paths were resolved against the directory replay ran in (another experiment's files of the same
    names, or none), and records ran in the sorted order of their keys (``analyze weights`` before the ``bench``
    it reads). A record keeps the directory it ran in (relative to its folder) and the position it first ran at."""
    project = tmp_path / "project"
    save_tiny(project / "model", arch="llama")
    write_jsonl(
        [Record(f"r{i}", f"p{i} is", f" w{i % 3}", label=f"w{i % 3}") for i in range(8)], project / "train.jsonl"
    )
    write_jsonl(
        [Record(f"q{i}", f"p{i} is", f" w{i % 3}", label=f"w{i % 3}") for i in range(2)], project / "queries.jsonl"
    )
    monkeypatch.chdir(project)
    bench = ["bench", "--task", "path:train.jsonl:queries.jsonl", "--model", "model", "--methods", "gradsim,bm25"]
    bench += ["--seeds", "0", "--out", "bx", "--device", "cpu", "--threads", "1", "--max-length", "64"]
    first = invoke(*bench, "--epochs", "2")
    assert first.exit_code == 0, first.output
    analysis = invoke("analyze", "weights", "--bench", "bx", "--threads", "1")
    assert analysis.exit_code == 0, analysis.output
    last = invoke(*bench, "--epochs", "1", "--overwrite")  # rerun with other settings: keeps its first place
    assert last.exit_code == 0, last.output
    records = json.loads((project / "bx" / "config.json").read_text())["replay"]
    assert {k: (r["position"], r["cwd"]) for k, r in records.items()} == {
        "bench": (0, ".."),
        "analyze weights": (1, ".."),
    }
    expected = json.loads((project / "bx" / "bench.json").read_text())["rows"]

    moved, elsewhere = tmp_path / "moved", tmp_path / "elsewhere"
    shutil.move(project, moved)
    elsewhere.mkdir()
    write_jsonl([Record("other", "x", " y", label="y")], elsewhere / "train.jsonl")  # same name, other rows
    monkeypatch.chdir(elsewhere)
    for item in (moved / "bx").iterdir():
        if item.name != "config.json":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    replayed = invoke("replay", moved / "bx")
    assert replayed.exit_code == 0, replayed.output
    assert replayed.output.index("wherefrom bench") < replayed.output.index("wherefrom analyze weights")
    rows = json.loads((moved / "bx" / "bench.json").read_text())["rows"]
    assert [(r["method"], r["metrics"]) for r in rows] == [(r["method"], r["metrics"]) for r in expected]
    assert (moved / "bx" / "weights.json").is_file() and sorted(p.name for p in elsewhere.iterdir()) == ["train.jsonl"]


def test_evaluate_refuses_a_damping_none_of_its_methods_reads_before_reading_the_ground_truth(tmp_path):
    """userX: `evaluate --methods bm25 --damping 0.5` was taken and recorded (the damping in bm25's cache key and
    the evaluate record), changing no number; it is refused naming the flag, and with a method that reads it taken.
    A ``groundtruth.json`` that lacks what loading reads was a ``KeyError`` traceback: named as damaged."""
    folder = tmp_path / "gt"
    folder.mkdir()
    (folder / "groundtruth.json").write_text("{}")  # not read: the settings are checked first
    refused = invoke("evaluate", folder, "--methods", "bm25", "--damping", "0.5")
    assert refused.exit_code == 2, refused.output
    assert "method 'bm25' does not read --damping 0.5" in " ".join(refused.output.split())
    assert sorted(p.name for p in folder.iterdir()) == ["groundtruth.json"]
    taken = invoke("evaluate", folder, "--methods", "bm25,ekfac", "--damping", "0.5")
    assert taken.exit_code == 2 and "read --damping" not in taken.output, taken.output
    # then refused for the damaged groundtruth.json, naming it and what it lacks (a KeyError traceback, exit 1)
    said = " ".join(taken.output.split())
    assert "groundtruth.json is damaged: it lacks ['config', 'train_ids'" in said and "wherefrom replay" in said


def test_evaluate_of_an_unfinished_ground_truth_says_so_and_how_to_finish_it(tmp_path):
    """userL: `evaluate` of a ground-truth folder whose build was interrupted said only "not a ground-truth folder";
    a folder whose config.json records a groundtruth command is named unfinished, with the replay that finishes it."""
    folder = tmp_path / "gt"
    folder.mkdir()
    record = {"command": "groundtruth", "arguments": {}, "line": "wherefrom groundtruth --out gt", "position": 0}
    (folder / "config.json").write_text(json.dumps({"replay": {"groundtruth": record}}))
    result = invoke("evaluate", folder)
    assert result.exit_code == 2 and "an unfinished ground truth" in result.output, result.output
    assert f"wherefrom replay {folder}" in " ".join(result.output.split())
    other = invoke("evaluate", tmp_path)
    assert other.exit_code == 2 and "not a ground-truth folder" in other.output


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (["groundtruth", "--task", "rules", "--alpha", "0", "--out", "gt"], "--alpha 0.0: must be in (0, 1), got 0.0"),
        (["groundtruth", "--task", "rules", "--seed", "-1", "--out", "gt"], "--seed -1: must be >= 0, got -1"),
        (["tune", "gt", "--method", "ekfac", "--grid", "damping_factor=0.1", "--split-seed", "-1"], "--split-seed -1"),
        (["bench", "--task", "rules", "--epochs", "1", "--learning-rate", "inf", "--out", "b"], "--learning-rate inf"),
        # userA: LoRA flags beside full fine-tuning were taken, recorded, and a rerun refused over a change of nothing
        (
            ["finetune", "--train", "t.jsonl", "--full", "--lora-alpha", "16", "--out", "f"],
            "--full fine-tunes every weight with no LoRA adapter, so --lora-alpha 16 would change nothing",
        ),
        (["finetune", "--train", "t.jsonl", "--full", "--lora-dropout", "0.1", "--out", "f"], "--lora-dropout 0.1"),
        (
            ["finetune", "--train", "t.jsonl", "--full", "--lora-target", "q_proj", "--lora-target", "k_proj"],
            "so --lora-target q_proj,k_proj would change nothing",
        ),
        (
            ["bench", "--task", "rules", "--lora-rank", "0", "--lora-alpha", "4", "--out", "b"],
            "--lora-rank 0 fine-tunes",
        ),
        (
            ["fit", "--train", "t.jsonl", "--run", "r", "--no-eos", "--query-without-eos"],
            "--no-eos appends no EOS, so --query-without-eos has none to leave out",
        ),
        # reviewU: refused by AttributionConfig's check in Python's words ("chat_template=True")
        (
            ["fit", "--train", "t.jsonl", "--run", "r", "--template", "q {prompt} a {completion}", "--chat-template"],
            "--template and --chat-template are two layouts of one row: give one of them",
        ),
    ],
)
def test_out_of_range_settings_are_refused_naming_the_flag(tmp_path, monkeypatch, arguments, said):
    """``--alpha 0`` and ``--seed -1`` were refused only by the configuration, naming the field (``alpha must be in
    (0, 1)``), ``--split-seed -1`` by numpy (``expected non-negative integer``, no flag), and ``inf`` passed every
    ``>=`` check; each is now refused by its flag before the command starts, writing nothing."""
    monkeypatch.chdir(tmp_path)
    result = invoke(*arguments)
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_study_refused_for_its_data_leaves_no_output_folder(tmp_path):
    """``bench`` (and ``groundtruth``) made ``--out`` before recording themselves there, so a refusal of a data file
    left an empty folder; the record makes it now, and a refusal takes it away again."""
    (tmp_path / "trunc.jsonl").write_text('{"id": "a", "prompt": "x", "completion": " y", "label": "p"}\n{"id": "b"')
    (tmp_path / "good.jsonl").write_text('{"id": "a", "prompt": "x", "completion": " y", "label": "p"}\n')
    task = f"path:{tmp_path / 'trunc.jsonl'}:{tmp_path / 'good.jsonl'}"
    result = invoke("bench", "--task", task, "--methods", "bm25", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "trunc.jsonl, line 2: invalid JSON" in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_more_threads_than_cores_run_on_the_cores_with_a_note(monkeypatch):
    """``--threads 99999`` was an out-of-memory error (``methods``) or a failure to load a shared library (``query``),
    naming no flag; threads beyond the cores this process may use are cut to them, with a note."""
    import sys

    import torch

    monkeypatch.setattr(sys.modules["wherefrom.cli.app"], "available_cores", lambda: 2)
    before, chosen = torch.get_num_threads(), []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (chosen.append(n), set_threads(n)))
    result = invoke("methods", "--threads", "99999")
    assert result.exit_code == 0, result.output
    assert "--threads 99999: this process may use 2 CPU cores; running 2 threads" in result.output
    assert chosen == [2, before]  # set for the command, then put back


def test_an_evaluate_report_made_by_any_command_may_be_replaced(tmp_path):
    """reviewW: ``evaluate --out STEM`` recognised an earlier report by its command (``wherefrom evaluate ...``), so
    a report of the Python ``evaluate`` with a command of its own (``python benchmarks/groundtruth_tiny.py ...``) was
    refused as a file wherefrom did not write. Known by its layout now; a JSON file of another layout is refused."""
    from wherefrom.cli.settings import output_stem

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    for stem in (results / "groundtruth-tiny" / "evaluate", results / "groundtruth-smollm2" / "evaluate"):
        assert output_stem(stem) is None
    (tmp_path / "x.json").write_text(json.dumps({"command": "wherefrom evaluate", "config": {"methods": []}}))
    assert "x.json is a file wherefrom did not write" in output_stem(tmp_path / "x")


def test_a_setting_option_is_refused_beside_its_own_flag_only(workspace, tmp_path):
    """reviewQ: the refusal of ``--fisher empirical --option fisher=true`` refused lissa's own ``seed`` option beside
    ``--seed`` (another setting of the same name) and every replay of a run given ``--option damping=...`` (a replay
    gives each recorded setting, ``--damping None`` too). Only a setting option whose flag is off its default is."""
    model = ("--model", workspace / "model", "--max-length", "128")
    own = invoke("attribute", "--method", "lissa", *rows_args(workspace), *model, "--out", tmp_path / "a",
                 "--seed", "1", "--option", "seed=7", "--option", "depth=abc")  # fmt: skip
    assert own.exit_code == 2 and "option 'depth' got 'abc'" in own.output and "same setting" not in own.output
    done = invoke("attribute", "--method", "ekfac", *rows_args(workspace), *model, "--out", tmp_path / "b",
                  "--option", "damping=0.01")  # fmt: skip
    assert done.exit_code == 0, done.output
    again = invoke("replay", tmp_path / "b")
    assert again.exit_code == 0, again.output
