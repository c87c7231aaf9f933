"""Degenerate curvature: zero-gradient modules, zero damping, and no NaN in any score or JSON output.

The rule (``wherefrom.curvature.base``): every damping must be > 0 (refused by name at
construction, for every strategy); under the relative damping a curvature block that is exactly
zero contributes exactly 0 (warned); a non-finite score never reaches a score file or stdout.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import make_records, scale_lora_b
from wherefrom.cli import app
from wherefrom.core.data import Record
from wherefrom.core.scoring import Scores, save_scores
from wherefrom.curvature import make_curvature
from wherefrom.curvature.base import DegenerateCurvatureWarning, UnrepresentableCurvature
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.registry import METHODS, make_method
from wherefrom.models.tiny import save_tiny, tiny_llama, with_lora
from wherefrom.studies.generated import write_jsonl

# The rows of shared/cases/01 (a fresh LoRA adapter: lora_B = 0, so every lora_A gradient is 0).
CASE_TRAIN = [
    Record(f"r{i}", p, c)
    for i, (p, c) in enumerate([("ab cd:", " ef"), ("gh:", " ij kl"), ("ab:", " cd"), ("ef gh ij:", " ab")])
]
CASE_QUERIES = [Record("q0", "ab cd:", " ef")]
PER_MODULE = ["identity", "diagonal", "kfac", "ekfac", "exact", "datainf"]
EVERY_STRATEGY = [*PER_MODULE, "exact-full", "cg", "lissa", "arnoldi", "trak", "logra"]


def fresh_lora(tokenizer):
    return with_lora(tiny_llama(len(tokenizer), hidden=16, intermediate=32, layers=1), r=2, init_b_random=False)


def method(name: str, model, tokenizer, **config):
    """``make_method`` with small solver settings; ``exact-full`` is ``exact`` with ``blocks="full"``."""
    options = {
        "exact-full": {"blocks": "full"},
        "cg": {"max_iter": 300},
        "lissa": {"depth": 300},
        "arnoldi": {"rank": 64, "complement": True},
    }
    base = "exact" if name == "exact-full" else name
    return make_method(base, model, tokenizer, AttributionConfig(**config), **options.get(name, {}))


def zero_warning(name: str, match: str | None = None):
    """Every strategy with a curvature warns about a zero block; identity has none (G = 0, no damping)."""
    if name == "identity":
        import contextlib

        return contextlib.nullcontext()
    return pytest.warns(DegenerateCurvatureWarning, match=match)


def scores_of(name, model, tokenizer, train, queries, **config):
    m = method(name, model, tokenizer, **config)
    m.fit(train)
    return m.scores(queries, train)


@pytest.mark.parametrize("strategy", PER_MODULE)
def test_zero_gradient_module_contributes_exactly_zero(tokenizer, strategy):
    """Case 01: with all LoRA modules tracked, the scores equal those of the lora_B modules alone."""
    fisher = {"fisher": "empirical"} if strategy == "datainf" else {}
    with zero_warning(strategy, "lora_A"):
        everything = scores_of(strategy, fresh_lora(tokenizer), tokenizer, CASE_TRAIN, CASE_QUERIES, **fisher)
    reference = scores_of(
        strategy, fresh_lora(tokenizer), tokenizer, CASE_TRAIN, CASE_QUERIES, include=["lora_B"], **fisher
    )
    assert torch.isfinite(everything.per_module).all()
    zero = [i for i, n in enumerate(everything.module_names) if "lora_A" in n]
    assert len(zero) == 2 and bool((everything.per_module[zero] == 0).all())
    torch.testing.assert_close(everything.total, reference.total, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", EVERY_STRATEGY)
def test_all_tracked_gradients_zero_gives_zero_scores_for_every_strategy(tokenizer, strategy):
    """Only lora_A tracked on a fresh adapter: G = 0 everywhere; every strategy scores exactly 0 and warns."""
    train, queries = make_records(6, seed=11), make_records(2, seed=12, prefix="q")
    with zero_warning(strategy):
        scores = scores_of(strategy, fresh_lora(tokenizer), tokenizer, train, queries, include=["lora_A"])
    assert scores.total.shape == (2, 6) and bool((scores.total == 0).all())


def zero_attention_output(tokenizer):
    """A tiny Llama whose o_proj is zero: q/k/v get no gradient at all (our own input of the same kind)."""
    model = tiny_llama(len(tokenizer), hidden=16, intermediate=32, layers=1, seed=4)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    return model


@pytest.mark.parametrize("strategy", ["ekfac", "kfac", "diagonal", "exact"])
def test_zero_attention_block_under_default_damping(tokenizer, strategy):
    train, queries = make_records(8, seed=5), make_records(3, seed=6, prefix="q")
    with pytest.warns(DegenerateCurvatureWarning, match="q_proj"):
        everything = scores_of(strategy, zero_attention_output(tokenizer), tokenizer, train, queries)
    without = scores_of(
        strategy, zero_attention_output(tokenizer), tokenizer, train, queries, exclude=["q_proj", "k_proj", "v_proj"]
    )
    torch.testing.assert_close(everything.total, without.total, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["exact-full", "cg", "arnoldi"])
def test_zero_block_in_a_joint_inverse_drops_out_at_absolute_damping(tokenizer, strategy):
    """G is block diagonal with a zero block whose gradients are 0: the joint inverse equals the one without it."""
    train, queries = make_records(6, seed=7), make_records(2, seed=8, prefix="q")
    everything = scores_of(strategy, zero_attention_output(tokenizer), tokenizer, train, queries, damping=0.5)
    without = scores_of(
        strategy,
        zero_attention_output(tokenizer),
        tokenizer,
        train,
        queries,
        damping=0.5,
        exclude=["q_proj", "k_proj", "v_proj"],
    )
    torch.testing.assert_close(everything.total, without.total, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(n for n in METHODS if n not in ("repsim", "bm25", "tracin")))
@pytest.mark.parametrize(
    "setting",
    [
        {"damping": 0.0},
        {"damping": -1.0},
        {"damping": math.nan},
        {"damping_factor": 0.0},
        {"damping_factor": -0.1},
        {"damping": 1e-46},  # 0 in float32: trak returned scores of 1e19-1e20, exact ones decided by round-off
        {"damping": 1e-40},  # subnormal in float32
        {"damping_factor": 1e-45},
        {"damping": 1e39},  # infinite in float32: every preconditioned block was 0
    ],
)
def test_non_positive_damping_is_refused_by_name_before_any_work(tokenizer, name, setting):
    """Case 02: damping 0 on a rank-deficient curvature used to return 1e7-1e11 or NaN scores; a damping that float32,
    the curvature's precision, holds as 0 (or subnormal) is the same case."""
    key = next(iter(setting))
    # the typed option check (registry) or the strategy's own check, whichever meets it first
    with pytest.raises(
        ValueError, match=rf"{key} must be a finite number > 0|option '{key}' got .*allowed: a finite number > 0"
    ):
        make_method(
            name,
            tiny_llama(len(tokenizer), hidden=16, intermediate=32, layers=1),
            tokenizer,
            AttributionConfig(**setting),
        )


def test_case02_rows_zero_damping_refused_and_small_damping_finite(tokenizer):
    train = [Record("r0", "kl ab ef:", " cd ij kl ef"), Record("r1", "gh:", " ab")]
    queries = [Record("q0", "ab cd:", " ef"), Record("q1", "ij:", " gh kl")]
    with pytest.raises(ValueError, match=r"damping must be|option 'damping' got 0.0; allowed: a finite number > 0"):
        make_curvature("ekfac", damping=0.0)
    model = tiny_llama(len(tokenizer), hidden=16, intermediate=32, layers=1)
    for strategy in ("ekfac", "kfac", "exact"):
        attributor = Attributor(
            model, tokenizer, AttributionConfig(strategy=strategy, damping=1e-3, fisher="empirical")
        )
        attributor.fit(train)
        assert torch.isfinite(attributor.scores(queries, train).total).all()


def test_indefinite_relative_damping_is_refused_by_name():
    from wherefrom.curvature.base import relative_damping

    with pytest.raises(ValueError, match=r"'blk'.*mean eigenvalue -2"):
        relative_damping(None, 0.1, -2.0, "blk")
    assert relative_damping(None, 0.1, 0.0, "blk") == 0.0 and relative_damping(0.3, 0.1, -2.0, "blk") == 0.3


def scaled_lora(tokenizer, scale: float):
    """A tiny LoRA model whose ``lora_B`` is scaled by ``scale`` (:func:`tests.conftest.scale_lora_b`): its ``lora_A``
    gradient entries are about ``1e-4 x scale`` (root mean square; 1e-24 at 1e-20)."""
    return scale_lora_b(with_lora(tiny_llama(len(tokenizer), hidden=16, intermediate=32, layers=1), r=2, seed=0), scale)


FLOAT32_STATE = ["kfac", "ekfac", "diagonal"]


@pytest.mark.parametrize("scale", [1e-20, 1e-30])
@pytest.mark.parametrize("strategy", FLOAT32_STATE)
def test_gradients_whose_squares_leave_float32_are_refused_by_block(tokenizer, strategy, scale):
    """lora_A gradients of about 1e-24 and 1e-34: their curvature (about 1e-48, 1e-68) and its relative damping are 0
    in the float32 state of kfac/ekfac/diagonal. Before, kfac's float32 covariance underflowed to exactly 0 and took
    the block for a zero one (finite, wrong scores, a warning saying every gradient is 0), ekfac and diagonal failed
    on non-finite scores; now each refuses naming the block and the strategies that score it."""
    m = method(strategy, scaled_lora(tokenizer, scale), tokenizer, include=["lora_A"])
    with pytest.raises(UnrepresentableCurvature, match=r"q_proj\.lora_A.*float32.*exact, datainf, trak, or logra"):
        m.fit(CASE_TRAIN)


@pytest.mark.parametrize("strategy", FLOAT32_STATE)
def test_gradients_just_above_the_float32_floor_score_as_at_a_larger_scale(tokenizer, strategy):
    """lora_A gradients of about 1e-19: a relative damping of about 1e-39, subnormal in float32 but above the floor
    2^-136 (1.15e-41) that holds it to 1.2e-4, scores as at 1e-14 (the same model for scales this small; tolerance:
    relative 1e-4 of the largest score). A floor at float32's smallest normal number refused this block."""
    small, reference = (
        scores_of(strategy, scaled_lora(tokenizer, s), tokenizer, CASE_TRAIN, CASE_QUERIES, include=["lora_A"])
        for s in (1e-15, 1e-10)
    )
    assert reference.total.abs().max() > 1e-3
    torch.testing.assert_close(small.total, reference.total, rtol=1e-4, atol=1e-4 * float(reference.total.abs().max()))


def test_a_damping_factor_too_small_for_a_normal_block_is_named():
    """Gradients of ordinary size, damping_factor 1e-37 (allowed: float32 holds it): lambda about 1e-41 is below the
    floor, and the refusal names the damping factor, not the gradients."""
    from wherefrom.curvature.simple import Diagonal

    blocks = lambda: iter([{"m": torch.full((3, 2, 2), 1e-3)}])  # noqa: E731
    with pytest.raises(UnrepresentableCurvature, match=r"'m' \(diagonal\).*damping_factor is too small"):
        Diagonal(damping_factor=1e-37).fit_gradients(blocks, {"m": (2, 2)})


@pytest.mark.parametrize("strategy", ["exact", "datainf", "trak", "logra"])
def test_float64_curvature_scores_tiny_gradients_independent_of_their_scale(tokenizer, strategy):
    """The ways out that the refusal names: with the relative damping, influence is invariant to a module's gradient
    scale (G ~ c^2, lambda ~ c^2, q^T (G + lambda)^-1 g ~ 1), and these strategies give the same scores at 1e-20 and
    1e-30 (tolerance: float32 gradients, relative 1e-4)."""
    fisher = {"fisher": "empirical"} if strategy == "datainf" else {}
    small, smaller = (
        scores_of(
            strategy, scaled_lora(tokenizer, s), tokenizer, CASE_TRAIN, CASE_QUERIES, include=["lora_A"], **fisher
        )
        for s in (1e-20, 1e-30)
    )
    assert small.total.abs().max() > 1e-3
    torch.testing.assert_close(smaller.total, small.total, rtol=1e-4, atol=1e-4 * float(small.total.abs().max()))


def test_cosine_normalisation_of_tiny_gradients_is_a_cosine(tokenizer):
    """exact with normalize="cosine": the training gradients' norms are taken in float64. Their float32 squares were 0
    at 1e-30 (entries about 1e-34), the denominator was then 1, and a "cosine" of 22.96 came out; now the scores at
    1e-26 and 1e-30 equal those at 1e-10 (relative 1e-4)."""
    reference, *small = (
        scores_of(
            "exact",
            scaled_lora(tokenizer, s),
            tokenizer,
            CASE_TRAIN,
            CASE_QUERIES,
            include=["lora_A"],
            normalize="cosine",
        )
        for s in (1e-10, 1e-26, 1e-30)
    )
    assert float(reference.total.abs().max()) <= 1 + 1e-5
    for scores in small:
        torch.testing.assert_close(scores.total, reference.total, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("exponent", [-70, 70])
def test_kfac_covariance_sums_scale_exactly_with_the_factors(exponent, dtype):
    """The covariance sums of factors scaled by 2^e are those of the factors times 2^2e, bit for bit: at 2^-70
    (entries about 1e-21) the float32 product of the old sums was subnormal or 0, at 2^70 it overflowed; float64
    factors keep float64 precision."""
    from wherefrom.core.gradients import TokenFactors
    from wherefrom.curvature.kronecker import KFAC

    generator = torch.Generator().manual_seed(0)
    a, g = torch.randn(2, 5, 3, generator=generator), torch.randn(2, 5, 4, generator=generator)
    a, g = a.to(dtype), g.to(dtype)
    mask = torch.ones(2, 5, dtype=torch.bool)

    def sums(scale):
        stream = lambda: iter([(2, {"m": TokenFactors(a * scale, g * scale, mask)})])  # noqa: E731
        return KFAC.covariance_sums(stream, {"m": (4, 3)})[0]

    reference, scaled = sums(1.0), sums(2.0**exponent)
    for key in ("m.a_cov", "m.s_cov"):
        assert torch.equal(scaled[key], reference[key] * 2.0 ** (2 * exponent)), key
        assert reference[key].abs().min() > 0


def test_a_stage_of_another_layout_is_recomputed_not_resumed(tokenizer, tmp_path):
    """A K-FAC fit killed under an earlier version left stages of layout 1 (float32 eigenvalues, covariance sums that
    underflowed to 0 for tiny gradients): resuming them took such a block for a zero one. A stage whose layout is not
    the strategy's is recomputed: the resumed fit refuses the block as a fresh one does, and a normal fit resumed
    from a doctored old-layout stage equals a fresh fit."""
    from wherefrom.core.store import StageFolder
    from wherefrom.curvature.base import STAGE_FORMAT_KEY

    attributor = Attributor(
        scaled_lora(tokenizer, 1e-10), tokenizer, AttributionConfig(strategy="kfac", fisher="empirical")
    )

    def fit(stages=None):
        batches = lambda: attributor.batches(CASE_TRAIN).without_ids()  # noqa: E731
        return make_curvature("kfac").fit(
            attributor.model, attributor.modules, batches, attributor.train_loss_fn(), stages=stages
        )

    fresh = fit().state
    stages = StageFolder(tmp_path)
    fit(stages)
    for stage in ("covariances", "eigenbases"):
        tensors, info = stages.load(stage)
        assert info[STAGE_FORMAT_KEY] == 2
        del info[STAGE_FORMAT_KEY]
        stages.save(stage, {k: torch.zeros_like(v) for k, v in tensors.items()}, info)  # an "old" layout, zeroed
    resumed = fit(stages)
    assert fresh.keys() == resumed.state.keys()
    assert all(torch.equal(fresh[k], resumed.state[k]) for k in fresh)


def test_non_finite_scores_never_reach_a_score_file(tmp_path):
    per_module = torch.tensor([[[1.0, math.nan]], [[0.5, 0.5]]])
    scores = Scores(["q0"], ["a", "b"], ["m0", "m1"], per_module)
    with pytest.raises(ValueError, match=r"non-finite.*\['m0'\].*'q0' x train row 'b'"):
        save_scores(scores, tmp_path, "scores")
    assert list(tmp_path.iterdir()) == []


def test_cli_fresh_adapter_scores_finite_and_query_json_strict(tmp_path):
    """Case 01 through the CLI, all defaults: finite scores saved, ``query --json`` strict JSON."""
    save_tiny(tmp_path / "model")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])).save_pretrained(
        tmp_path / "adapter"
    )
    rows = make_records(6, seed=9)
    write_jsonl(rows, tmp_path / "train.jsonl")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"id": "q0", "prompt": "ab cd:", "completion": " ef"}) + "\n")
    runner = CliRunner()
    run = ["--run", str(tmp_path / "run")]
    fit = runner.invoke(
        app,
        [
            "fit",
            "--train",
            str(tmp_path / "train.jsonl"),
            "--model",
            str(tmp_path / "model"),
            "--adapter",
            str(tmp_path / "adapter"),
            *run,
        ],
    )
    assert fit.exit_code == 0, fit.output
    assert runner.invoke(app, ["scores", "--queries", str(tmp_path / "queries.jsonl"), *run]).exit_code == 0
    from safetensors.torch import load_file

    assert torch.isfinite(load_file(str(tmp_path / "run" / "scores" / "scores.safetensors"))["total"]).all()
    result = runner.invoke(app, ["query", "ab cd:", " ef", "--json", "--top-k", "2", *run])
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    report = json.loads(result.stdout[result.stdout.index("{") :], parse_constant=refuse)
    assert all(math.isfinite(p["score"]) for p in report["proponents"])
    refused = runner.invoke(
        app,
        [
            "fit",
            "--train",
            str(tmp_path / "train.jsonl"),
            "--model",
            str(tmp_path / "model"),
            "--damping",
            "0",
            "--run",
            str(tmp_path / "zero"),
        ],
    )
    assert refused.exit_code != 0 and "damping 0.0: must be a finite number > 0" in refused.output


def test_prefilter_not_scored_mark_is_kept_but_a_nan_candidate_is_refused(tmp_path):
    """BM25 prefiltering marks non-candidates NaN ("not scored", ``wherefrom.methods.lexical``); a NaN among
    the candidates is still refused."""
    from wherefrom.methods.lexical import CandidateScores

    mask = torch.tensor([[True, False]])
    kept = CandidateScores(["q0"], ["a", "b"], ["m0"], torch.tensor([[[1.0, math.nan]]]), candidate_mask=mask)
    assert save_scores(kept, tmp_path, "kept").exists()
    broken = CandidateScores(["q0"], ["a", "b"], ["m0"], torch.tensor([[[math.nan, math.nan]]]), candidate_mask=mask)
    with pytest.raises(ValueError, match="'q0' x train row 'a'"):
        save_scores(broken, tmp_path, "broken")


@pytest.mark.parametrize(
    ("strategy", "damping"),
    [("ekfac", None), ("kfac", None), ("diagonal", None), ("diagonal", "0.1"), ("cg", None), ("lissa", None),
     ("arnoldi", None), ("datainf", None)],
)  # fmt: skip
def test_a_model_with_a_nan_weight_is_refused_by_name_and_no_stage_is_saved(tmp_path, strategy, damping):
    """A NaN weight in a tracked module: ``fit`` stops with one named error (EK-FAC's eigendecomposition failed with
    a linear-algebra traceback; the relative damping of the other strategies blamed an indefinite Hessian) and saves
    no fitting stage of NaN statistics (which bound the folder to the bad model's settings)."""
    model = save_tiny(tmp_path / "model")
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if "mlp.up_proj" in k)
    weights[name][0, 0] = math.nan
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    rows = make_records(6, seed=9)
    write_jsonl(rows, tmp_path / "train.jsonl")
    fit = CliRunner().invoke(
        app,
        ["fit", "--train", str(tmp_path / "train.jsonl"), "--model", str(model), "--run", str(tmp_path / "run"),
         "--strategy", strategy, "--threads", "1", *(["--damping", damping] if damping else [])],
    )  # fmt: skip
    assert fit.exit_code == 2, fit.output
    text = " ".join(fit.output.split())
    assert "NaN or infinite entries" in text and "indefinite" not in text, text
    assert f"strategy {strategy!r}" in text or "curvature block '" in text, text
    assert not list((tmp_path / "run" / "factors").rglob("*.safetensors"))


def test_ekfac_warns_when_its_correction_lies_in_a_null_space_whose_basis_rounding_chose(tokenizer):
    """userY: EK-FAC with the true Fisher on 2 training rows gave scores 0.16 of the largest apart between one and
    two processes (and between batch sizes 8 and 1), far beyond the stated tolerance. Its output-gradient
    covariance S is singular (fewer loss tokens than a module's width), and the correction pass's fresh label draws
    put a third or more of its mass in S's null space, whose eigenbasis is whatever rounding gives: the fit warns,
    naming the share; on 40 rows, or with the empirical Fisher (one set of gradients), nothing lies there, the fit
    is silent and the batch size changes nothing beyond float round-off."""
    import warnings

    from wherefrom.curvature.kronecker import ArbitraryBasisWarning
    from wherefrom.models.tiny import tiny_gpt2

    model = tiny_gpt2(len(tokenizer))
    queries = make_records(3, seed=7, prefix="q")

    def scores(train, fisher, batch_size):
        attributor = Attributor(
            model, tokenizer, AttributionConfig(strategy="ekfac", fisher=fisher, batch_size=batch_size)
        )
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            attributor.fit(train)
        told = [str(w.message) for w in seen if issubclass(w.category, ArbitraryBasisWarning)]
        return attributor.scores(queries, train).total, told

    def apart(a, b):
        return float((a - b).abs().max() / a.abs().max())

    two = make_records(2, seed=3)
    (eight, told), (one, told_one) = scores(two, "true", 8), scores(two, "true", 1)
    assert told and told_one and "--batch-size" in told[0] and "%)" in told[0], told
    assert apart(eight, one) > 1e-3  # what the warning is about
    many = make_records(40, seed=3)
    (eight, told), (one, told_one) = scores(many, "true", 8), scores(many, "true", 1)
    assert not told and not told_one and apart(eight, one) < 1e-4
    (eight, told), (one, told_one) = scores(two, "empirical", 8), scores(two, "empirical", 1)
    assert not told and not told_one and apart(eight, one) < 1e-4
