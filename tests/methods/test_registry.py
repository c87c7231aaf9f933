"""The method registry: every method builds from its spec, every option is validated with a named error
before any model work, setting options act like the config's settings, and `wherefrom methods` prints it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import build_model, make_records
from wherefrom.cli import app
from wherefrom.core.options import OptionError, OptionSpec, check_options
from wherefrom.core.store import write_json_checked
from wherefrom.curvature import STRATEGIES, load_curvature, make_curvature
from wherefrom.curvature.base import DAMPING_OPTIONS
from wherefrom.engine.api import AttributionConfig
from wherefrom.methods.registry import FAMILIES, METHODS, SETTING_OPTIONS, InfluenceMethod, make_method
from wherefrom.studies.analyses.ihvp import influence_methods
from wherefrom.studies.generated import write_jsonl


@pytest.fixture(scope="module")
def model():
    return build_model("lora")


def required(name: str, model) -> dict:
    """The required options of ``name`` (only ``tracin``'s checkpoints): one in-memory checkpoint."""
    return {"checkpoints": [(model, 0.1)]} if name == "tracin" else {}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_with_its_defaults_given_or_not(name, model, tokenizer):
    spec = METHODS[name]
    assert spec.family in FAMILIES and spec.citation and spec.description
    plain = make_method(name, model, tokenizer, AttributionConfig(batch_size=5), **required(name, model))
    defaults = {o.name: o.default for o in spec.options if not o.required}
    explicit = make_method(name, model, tokenizer, AttributionConfig(batch_size=5), **defaults, **required(name, model))
    assert callable(plain.fit) and callable(plain.scores) and type(explicit) is type(plain)
    if spec.family == "influence":
        # The spec's defaults are the constructors' and the config's: giving them changes nothing.
        assert isinstance(plain, InfluenceMethod)
        assert plain.attributor.config.strategy == spec.settings["strategy"]
        assert explicit.attributor.curvature.options() == plain.attributor.curvature.options()
        plain_config = plain.attributor.config.to_dict()
        explicit_config = explicit.attributor.config.to_dict()
        assert {k: v for k, v in explicit_config.items() if k != "strategy_options"} == {
            k: v for k, v in plain_config.items() if k != "strategy_options"
        }


def every_spec() -> list[tuple[str, OptionSpec]]:
    specs = [("setting", s) for s in (*SETTING_OPTIONS, *DAMPING_OPTIONS)]
    specs += [(f"strategy {n}", s) for n, cls in STRATEGIES.items() for s in cls.option_specs]
    specs += [(f"method {n}", s) for n, m in METHODS.items() for s in m.options]
    return specs


@pytest.mark.parametrize(("owner", "spec"), every_spec(), ids=lambda x: getattr(x, "name", x))
def test_every_default_passes_its_own_validation(owner, spec):
    assert spec.help, f"{owner}: option {spec.name} has no help"
    if spec.required:
        with pytest.raises(OptionError, match=f"needs option '{spec.name}'"):
            check_options(owner, [spec], {})
    else:
        assert check_options(owner, [spec], {spec.name: spec.default}) == {spec.name: spec.default}


def test_datainf_presets_the_empirical_fisher_and_an_option_overrides_it(model, tokenizer):
    assert make_method("datainf", model, tokenizer).attributor.config.fisher == "empirical"
    assert make_method("datainf", model, tokenizer, fisher="true").attributor.config.fisher == "true"
    assert make_method("gradsim-cosine", model, tokenizer).attributor.config.normalize == "cosine"


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("ekfac", {"rank": 3}, ["method 'ekfac' has no option(s) ['rank']", "3", "'damping'", "'fisher'"]),
        ("lissa", {"depth": "abc"}, ["method 'lissa'", "option 'depth'", "'abc'", "an integer >= 1"]),
        ("lissa", {"depth": 0}, ["method 'lissa'", "option 'depth'", "got 0", "an integer >= 1"]),
        ("arnoldi", {"rank": 2.5}, ["method 'arnoldi'", "option 'rank'", "2.5", "an integer >= 1"]),
        ("arnoldi", {"complement": 1}, ["method 'arnoldi'", "option 'complement'", "got 1", "true or false"]),
        ("cg", {"tol": 0.0}, ["method 'cg'", "option 'tol'", "got 0.0", "a finite number > 0"]),
        ("exact", {"blocks": "diag"}, ["method 'exact'", "option 'blocks'", "'diag'", 'one of "module", "full"']),
        ("ekfac", {"damping": -1.0}, ["method 'ekfac'", "option 'damping'", "-1.0", "a finite number > 0 or null"]),
        ("ekfac", {"fisher": "sampled"}, ["method 'ekfac'", "option 'fisher'", 'one of "true", "empirical"']),
        ("bm25", {"b": 2}, ["method 'bm25'", "option 'b'", "got 2", "a finite number in [0, 1]"]),
        ("repsim", {"pooling": "max"}, ["method 'repsim'", "option 'pooling'", '"last_prompt", "last", "mean"']),
        ("trak", {"dim": "many"}, ["method 'trak'", "option 'dim'", "'many'", "an integer >= 1"]),
        # userO: listed by `wherefrom methods`, refused by the method after the model loaded (LoGra's only)
        ("trak", {"strategy": "kfac"}, ["method 'trak'", "option 'strategy'", "'kfac'", 'allowed: one of "exact"']),
        ("tracin", {}, ["method 'tracin' needs option 'checkpoints'", "a list"]),
        ("tracin", {"checkpoints": "ckpt"}, ["method 'tracin'", "option 'checkpoints'", "'ckpt'", "a list"]),
        # userB: inf met every lower bound and NaN every option without one (lissa's safety=inf divided by zero in
        # fit, cg's tol=inf stopped at once with no warning, lissa's scale=inf was blamed on the model, bm25's
        # k1=inf scored NaN); also as text, as the command line gives them
        ("lissa", {"safety": float("inf")}, ["method 'lissa'", "option 'safety'", "got inf", "a finite number >= 1"]),
        ("cg", {"tol": "Infinity"}, ["method 'cg'", "option 'tol'", "'Infinity'", "a finite number > 0"]),
        ("lissa", {"tol": float("inf")}, ["method 'lissa'", "option 'tol'", "got inf", "a finite number > 0"]),
        ("lissa", {"scale": float("inf")}, ["method 'lissa'", "option 'scale'", "got inf", "a finite number"]),
        ("bm25", {"k1": float("inf")}, ["method 'bm25'", "option 'k1'", "got inf", "a finite number >= 0"]),
        ("bm25", {"epsilon": float("nan")}, ["method 'bm25'", "option 'epsilon'", "got nan", "a finite number"]),
        ("bm25", {"epsilon": "NaN"}, ["method 'bm25'", "option 'epsilon'", "'NaN'", "a finite number"]),
        ("cg", {"tol": "1" + "0" * 400}, ["method 'cg'", "option 'tol'", "a finite number > 0"]),  # OverflowError
        # userO: above the option's bound of > 0, refused by the curvature's own check without naming the option
        ("ekfac", {"damping": 1e-46}, ["method 'ekfac'", "option 'damping' got 1e-46", "at least 1.175e-38"]),
        ("lissa", {"damping_factor": 1e-46}, ["method 'lissa'", "option 'damping_factor' got 1e-46", "at least"]),
        # userB: listed and taken, then refused by the fit, after the model was set up
        ("exact", {"reduction": "mean"}, ["method 'exact'", "reduction='mean' is not supported", "reduction='sum'"]),
        ("lissa", {"reduction": "mean"}, ["method 'lissa'", "forms the GGN of the summed completion loss itself"]),
    ],
)
def test_bad_options_are_named_errors_before_any_model_work(name, options, words):
    """No model at all: the error must come from the spec, before anything touches the model."""
    with pytest.raises(OptionError) as caught:
        make_method(name, None, None, **options)
    assert isinstance(caught.value, ValueError)
    for word in words:
        assert word in str(caught.value), f"{word!r} not in {caught.value}"


def test_text_values_are_read_as_json_for_typed_options(model, tokenizer):
    lissa = make_method("lissa", model, tokenizer, depth="300", scale="null", tol="1e-3").attributor.curvature
    assert (lissa.depth, lissa.scale, lissa.tol) == (300, None, 1e-3)
    assert make_method("arnoldi", model, tokenizer, complement="true").attributor.curvature.complement is True
    assert make_method("cg", model, tokenizer, tol=1).attributor.curvature.tol == 1.0  # an int is a number
    with pytest.raises(OptionError, match=r"strategy 'lissa': option 'depth' got 'abc'; allowed: an integer >= 1"):
        make_curvature("lissa", depth="abc")


def test_a_text_option_takes_the_text_that_the_command_line_read_as_json():
    """`--option fisher=true` (or a tune grid `fisher=empirical,true`) reached the option as JSON `true`, and was
    refused with "got True; allowed: one of "true", "empirical"": the user typed an allowed value. A text option
    takes a JSON scalar as the text typed; other values are still refused."""
    spec = OptionSpec("fisher", type=str, default="true", choices=("true", "empirical"))
    assert spec.check(True, "method 'ekfac'") == "true" and spec.check("empirical", "m") == "empirical"
    assert OptionSpec("name", type=str, default="a").check(300, "m") == "300"
    with pytest.raises(OptionError, match=r"option 'fisher' got False; allowed: one of \"true\", \"empirical\""):
        spec.check(False, "method 'ekfac'")


def test_load_curvature_validates_the_saved_options(tmp_path):
    make_curvature("datainf", max_bytes=100).save(tmp_path)
    assert load_curvature(tmp_path).max_bytes == 100
    meta = json.loads((tmp_path / "curvature.json").read_text())
    meta["options"]["max_bytes"] = "lots"
    write_json_checked(meta, tmp_path / "curvature.json")  # a consistent file whose saved option is invalid
    with pytest.raises(OptionError, match="strategy 'datainf': option 'max_bytes' got 'lots'"):
        load_curvature(tmp_path)


@pytest.mark.parametrize("name", ["ekfac", "trak"])
def test_damping_option_gives_the_scores_of_the_damping_setting(name, model, tokenizer):
    train, queries = make_records(8, seed=31), make_records(2, seed=32, prefix="q")
    options = {"dim": 32} if name == "trak" else {}

    def scores(config: AttributionConfig, **extra) -> torch.Tensor:
        method = make_method(name, model, tokenizer, config, **options, **extra)
        method.fit(train)
        return method.scores(queries, train).total

    by_option = scores(AttributionConfig(batch_size=4), damping=0.5)
    by_setting = scores(AttributionConfig(batch_size=4, damping=0.5))
    torch.testing.assert_close(by_option, by_setting, rtol=0, atol=0)
    assert not torch.allclose(by_option, scores(AttributionConfig(batch_size=4))), "damping had no effect"


def test_influence_methods_come_from_the_registry():
    names = ["ekfac", "tracin", "repsim", "trak", "gradsim-cosine", "bm25", "lissa", "nope"]
    assert influence_methods(names) == ["ekfac", "gradsim-cosine", "lissa"]


def test_cli_methods_lists_every_method_with_its_options():
    runner = CliRunner()
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)["methods"]
    assert [m["name"] for m in listed] == list(METHODS)
    lissa = next(m for m in listed if m["name"] == "lissa")
    depth = next(o for o in lissa["options"] if o["name"] == "depth")
    assert (depth["type"], depth["default"], depth["allowed"]) == ("int", 1000, "an integer >= 1")
    assert "Agarwal" in lissa["citation"]
    text = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert text.exit_code == 0 and all(name in text.stdout for name in METHODS)


def test_cli_attribute_bad_option_exits_2_with_the_named_message_before_loading_the_model(tmp_path):
    """The model folder cannot be loaded (a config.json of nothing, no weights: ``--model``'s own check, as it is
    parsed, passes): the option error must come first, as a message, not a traceback."""
    for name in ("train", "queries"):  # valid rows: the argument checks pass, the model is never loaded
        write_jsonl(make_records(2, seed=1, prefix=name), tmp_path / f"{name}.jsonl")
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text("{}")
    result = CliRunner().invoke(
        app,
        [
            "attribute",
            "--method",
            "lissa",
            "--option",
            "depth=abc",
            "--train",
            str(tmp_path / "train.jsonl"),
            "--queries",
            str(tmp_path / "queries.jsonl"),
            "--model",
            str(tmp_path / "no-model"),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "method 'lissa': option 'depth' got 'abc'; allowed: an integer >= 1" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "out").exists()


OTHER_VALUES = {
    "strategy": "kfac",
    "fisher": "empirical",
    "damping": 5.0,
    "damping_factor": 3.0,
    "reduction": "mean",
    "query_rank": 1,
    "include": [r"q_proj"],
    "exclude": [r"v_proj"],
    "batch_size": 3,
    "max_length": 6,
    "query_without_eos": True,
    "seed": 7,
    "autocast": "bfloat16",
}
"""An off-default value of each attribution setting that ``fit`` or ``attribute`` takes from the command line."""


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_setting_a_method_does_not_declare_leaves_its_scores_unchanged(name, model, tokenizer):
    """``MethodSpec.settings_read`` is what the CLI refuses the rest by (refuse_unread_settings): a setting outside
    it must change no score, or the refusal would drop a setting that matters."""
    train, queries = make_records(6, seed=41), make_records(2, seed=42, prefix="q")
    options = {**required(name, model), **{"trak": {"dim": 16}, "logra": {"dim_in": 2, "dim_out": 2}}.get(name, {})}

    def scores(**settings) -> torch.Tensor:
        method = make_method(name, model, tokenizer, AttributionConfig(**{"batch_size": 2, **settings}), **options)
        method.fit(train)
        return method.scores(queries, train).total

    base = scores()
    unread = [setting for setting in OTHER_VALUES if setting not in METHODS[name].settings_read]
    for setting in unread:
        torch.testing.assert_close(scores(**{setting: OTHER_VALUES[setting]}), base, rtol=0, atol=0, msg=setting)
    expected = {"gradsim", "gradsim-cosine", "identity", "trak", "logra", "tracin", "repsim", "bm25"}
    assert bool(unread) == (name in expected), unread


def test_an_absolute_damping_beside_a_damping_factor_option_is_refused():
    """userX: `tune --grid damping=0.1 --grid damping_factor=1,0.01` scored two identical points and marked one
    "chosen", and `evaluate --option ekfac.damping=0.1 --option ekfac.damping_factor=1` recorded both, where the
    command line refuses `--damping` with `--damping-factor`. A method's options are refused alike; a factor at
    its default, or beside no absolute damping, is not."""
    from wherefrom.methods.registry import method_settings

    with pytest.raises(
        OptionError, match=r"method 'ekfac': option damping=0.1 sets lambda itself, so damping_factor=1"
    ):
        method_settings("ekfac", None, {"damping": 0.1, "damping_factor": 1.0})
    assert method_settings("ekfac", None, {"damping": 0.1, "damping_factor": 0.1})[0].damping == 0.1
    assert method_settings("ekfac", None, {"damping": None, "damping_factor": 1.0})[0].damping_factor == 1.0


@pytest.mark.parametrize("name", ["trak", "logra"])
def test_with_curvature_false_the_projected_curvature_settings_change_no_score_and_are_refused(name, model, tokenizer):
    """userB: ``trak``/``logra`` with ``curvature=False`` took ``fisher`` and ``strategy`` and ignored them. Those
    (``MethodSpec.skipped_with``) leave the scores as they are, so where a run or study is made
    (``refuse_skipped_options``) one given is refused naming it (a strategy at its default, as a replay gives it,
    is not), and the command line's refusal of unread flags counts them as unread. The damping stays: it changes
    no score here, but an ``index --precondition empirical`` of the run damps the stored rows' Fisher with it.
    ``method_settings``, which also opens a recorded run, still takes them: an older version recorded such runs."""
    from wherefrom.methods.registry import method_settings, refuse_skipped_options

    train, queries = make_records(6, seed=41), make_records(2, seed=42, prefix="q")
    dims = {"trak": {"dim": 16}, "logra": {"dim_in": 2, "dim_out": 2}}[name]

    def scores(**settings) -> torch.Tensor:
        config = AttributionConfig(**{"batch_size": 2, **settings})
        method = make_method(name, model, tokenizer, config, curvature=False, **dims)
        method.fit(train)
        return method.scores(queries, train).total

    torch.testing.assert_close(scores(fisher="empirical"), scores(), rtol=0, atol=0)
    off = {"curvature": False}
    with pytest.raises(OptionError, match=f"method '{name}': fisher='empirical' with curvature=False"):
        refuse_skipped_options(name, {"fisher": "empirical"}, off)
    refuse_skipped_options(name, {"damping": 0.5, "fisher": AttributionConfig().fisher}, off)
    refuse_skipped_options(name, {"fisher": "empirical"}, {"curvature": True})
    assert method_settings(name, None, {**off, "fisher": "empirical"})[0].fisher == "empirical"
    if name == "logra":
        with pytest.raises(OptionError, match="strategy='ekfac' with curvature=False"):
            refuse_skipped_options(name, {}, {**off, "strategy": "ekfac"})
        refuse_skipped_options(name, {}, {**off, "strategy": "exact"})
    spec = METHODS[name]
    assert not spec.takes("fisher", "empirical", off) and spec.takes("fisher", "empirical", {})
    assert spec.takes("damping", 0.5, off)


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"base": 5}, "method 'tracin': option 'base' got 5: Model folder not found: 5"),
        ({"base": "no-such-folder"}, "option 'base' got 'no-such-folder': Model folder not found"),
        ({"device": "bogus"}, "option 'device' got 'bogus': not a device; available here: cpu"),
        ({"device": "cuda:7"}, "option 'device' got 'cuda:7': CUDA device cuda:7 is not available on this machine"),
    ],
)
def test_tracins_base_and_device_are_checked_as_options(options, said):
    """userO: ``base`` and ``device`` took any value (``object``), so ``base=5`` and ``device="cuda"`` on a CPU
    machine ended in tracebacks after the model loaded; each is an :class:`OptionError` naming the option."""
    from wherefrom.methods.registry import method_settings

    with pytest.raises(OptionError) as caught:
        method_settings("tracin", None, options, supplied=("checkpoints",))
    assert said in str(caught.value)
    assert method_settings("tracin", None, {"base": lambda: None, "device": "cpu"}, supplied=("checkpoints",))


@pytest.mark.parametrize(
    ("given", "said"),
    [
        (["--option", "damping=0.3", "--damping-factor", "0.5"], "method 'ekfac' does not read --damping-factor 0.5"),
        (
            ["--damping", "0.3", "--option", "damping_factor=0.5"],
            "damping=0.3 sets lambda itself, so damping_factor=0.5",
        ),
    ],
)
def test_an_absolute_damping_and_a_factor_from_a_flag_and_an_option_are_refused(tmp_path, given, said):
    """userO: ``--damping`` with ``--damping-factor`` (or both as options) was refused, one as a flag and the other as
    an option was taken, the factor recorded and unused (scores equal to the run without it). A method with its own
    absolute damping does not read the factor (``MethodSpec.takes``), so a study's ``--damping-factor`` is refused
    only where no method reads it (reviewW: ``--methods ekfac,kfac --option ekfac.damping=...`` is kfac's factor)."""
    assert not METHODS["ekfac"].takes("damping_factor", 0.5, {"damping": 0.3}) and METHODS["kfac"].takes(
        "damping_factor"
    )
    for name in ("train", "queries"):
        write_jsonl(make_records(2, seed=1, prefix=name), tmp_path / f"{name}.jsonl")
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text("{}")  # never loaded: refused before
    args = ["attribute", "--method", "ekfac", "--train", str(tmp_path / "train.jsonl"), "--queries"]
    args += [str(tmp_path / "queries.jsonl"), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, [*args, *given])
    assert result.exit_code == 2 and said in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists()


def test_an_unknown_strategy_option_lists_the_strategys_own_options_not_the_damping_settings():
    """userO: ``--strategy ekfac --strategy-option foo=1`` listed ``['damping', 'damping_factor']`` as ekfac's
    options, and ``--strategy-option damping=0.3`` was then refused as "the damping setting, not a strategy
    option"."""
    from wherefrom.curvature import configured_curvature

    with pytest.raises(OptionError, match=r"strategy 'ekfac' has no option\(s\) \['foo'\] .*its options are \[\]$"):
        configured_curvature("ekfac", None, 0.1, {"foo": 1})
    with pytest.raises(
        OptionError, match=r"strategy 'lissa' has no option\(s\) \['foo'\].*its options are \['curvature', 'probes'"
    ):
        configured_curvature("lissa", None, 0.1, {"foo": 1})
