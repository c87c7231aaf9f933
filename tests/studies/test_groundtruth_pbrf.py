"""PBRF (``wherefrom.studies.groundtruth.pbrf``) against exact influence on a tiny float64 GPT-2.

Setup: tiny GPT-2 in float64, tracked modules ``mlp.c_fc`` + ``mlp.c_proj`` (``Conv1D`` with bias,
P = 2,128), 12 training rows, 4 queries, absolute damping ``lambda = trace(G) / P`` (1 x the mean
eigenvalue, from ``exact``). GPT-2 rather than Llama because Hugging Face's Llama computes RMSNorm
and rotary embeddings in float32 even in a float64 model, which puts a noise floor of about
``1e-7 / eps`` on the relative objective gradient and so on the solve; GPT-2 is float64 throughout.

Measured (L-BFGS, ``tol`` 1e-6, 4 rows x 4 queries, influences of both signs; ``exact`` with
``blocks="full"``, same lambda):

* ``eps = 1e-4`` (the test): Pearson 0.9999999982, max |PBRF - exact| / max |exact| = 1.5e-4
  (asserted: Pearson > 0.9999, error < 2e-3, same sign wherever |exact| > 1% of its maximum);
  49-82 L-BFGS iterations per solve.
* Outside the test (first 6 rows): ``eps = 1e-5``: max relative error 1.1e-6; ``eps = 1e-3``: 1.0e-2;
  ``eps = 1e-2``: 0.15. At this damping the response is clearly nonlinear already at ``eps`` near
  ``1 / N``: that is what PBRF measures and influence functions linearise away.
* One-sided vs central difference at ``eps = 1e-4``: 2.2e-3 apart; Adam (mini-batches of 6, lr 0.05)
  vs L-BFGS: 0.44 relative error after 5 steps, 0.035 after 60 (L-BFGS is the default for that reason).
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, replace

import pytest
import torch

from tests.conftest import build_model, make_records
from wherefrom.curvature import ConvergenceWarning
from wherefrom.engine.api import AttributionConfig
from wherefrom.methods.registry import make_method
from wherefrom.models.tiny import tiny_tokenizer
from wherefrom.studies.groundtruth.pbrf import PBRFConfig, pbrf_config, pbrf_influence

INCLUDE = [r"mlp\.c_fc", r"mlp\.c_proj"]
SMALL = [r"attn\.c_proj"]  # P = 272, for the quick checks


@functools.cache
def setup(include: tuple[str, ...] = tuple(INCLUDE)):
    model = build_model("gpt2").double()
    tokenizer = tiny_tokenizer()
    train, queries = make_records(12, seed=1), make_records(4, seed=2, prefix="q")
    reference = make_method(
        "exact", model, tokenizer, AttributionConfig(include=list(include), damping_factor=1.0), blocks="full"
    )
    reference.fit(train)
    lam = float(reference.attributor.curvature.state["full.damping"])
    exact = make_method("exact", model, tokenizer, AttributionConfig(include=list(include), damping=lam), blocks="full")
    exact.fit(train)
    scores = exact.scores(queries, train).total.double()
    return model, tokenizer, train, queries, lam, scores


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_pbrf_matches_exact_influence_as_eps_vanishes():
    model, tokenizer, train, queries, lam, exact = setup()
    rows = [0, 9, 10, 11]  # exact influence of both signs among them
    info: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        pbrf = pbrf_influence(
            model,
            tokenizer,
            train,
            queries,
            rows,
            PBRFConfig(eps=1e-4, damping=lam, tol=1e-6),
            AttributionConfig(include=INCLUDE),
            info=info,
        )
    want = exact[:, rows]
    assert pbrf.shape == want.shape and pbrf.dtype == torch.float64
    pearson = float(torch.corrcoef(torch.stack([pbrf.flatten(), want.flatten()]))[0, 1])
    error = float((pbrf - want).abs().max() / want.abs().max())
    iterations = [s["iterations"] for r in info["rows"] for s in r["solves"]]
    print(
        f"PBRF vs exact: Pearson {pearson:.10f}, max relative error {error:.2e}, L-BFGS iterations {min(iterations)}-{max(iterations)}"
    )
    assert pearson > 0.9999
    assert error < 2e-3
    assert info["all_converged"] and info["damping"] == lam and info["parameters"] == 2128
    # one sign convention: wherever exact influence is clearly non-zero, PBRF has its sign
    clear = want.abs() > 1e-2 * want.abs().max()
    assert clear.any() and (want[clear] > 0).any() and (want[clear] < 0).any()
    assert torch.equal(torch.sign(pbrf[clear]), torch.sign(want[clear]))


def test_weights_and_flags_restored_even_on_error():
    model, tokenizer, train, queries, lam, _ = setup()
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.warns(ConvergenceWarning):  # 5 steps are not enough: still restored
        pbrf_influence(
            model,
            tokenizer,
            train,
            queries,
            [0],
            PBRFConfig(eps=1e-3, damping=lam, steps=5),
            AttributionConfig(include=SMALL),
        )
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)

    def failing(rows, _description):
        for i, row in enumerate(rows):
            if i == 1:
                raise KeyboardInterrupt  # interrupted after one row was solved
            yield row

    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pbrf_influence(
            model,
            tokenizer,
            train,
            queries,
            [0, 1],
            PBRFConfig(eps=1e-3, damping=lam, steps=5),
            AttributionConfig(include=SMALL),
            progress=failing,
        )
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_one_sided_difference_cache_and_ids(tmp_path):
    model, tokenizer, train, queries, lam, _ = setup()
    config = PBRFConfig(eps=1e-4, damping=lam, tol=1e-6)
    attribution = AttributionConfig(include=SMALL)
    central = pbrf_influence(model, tokenizer, train, queries, [3, "r7"], config, attribution, cache=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["row-3.json", "row-7.json"]
    info: dict = {}
    again = pbrf_influence(model, tokenizer, train, queries, [3, 7], config, attribution, info=info, cache=tmp_path)
    assert torch.equal(central, again) and all(r["reused"] for r in info["rows"])
    one_sided = pbrf_influence(
        model,
        tokenizer,
        train,
        queries,
        [3, 7],
        PBRFConfig(eps=1e-4, damping=lam, tol=1e-6, symmetric=False),
        attribution,
        cache=tmp_path,
    )  # another config: recomputed, not reused
    error = float((one_sided - central).abs().max() / central.abs().max())
    print(f"one-sided vs central difference at eps=1e-4: max relative difference {error:.1e}")
    assert 0 < error < 1e-2


def test_default_damping_from_hutchinson_trace():
    model, tokenizer, train, queries, _, _ = setup()
    info: dict = {}
    reference = make_method(
        "exact", model, tokenizer, AttributionConfig(include=SMALL, damping_factor=0.5), blocks="full"
    )
    reference.fit(train)
    want = float(reference.attributor.curvature.state["full.damping"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pbrf_influence(
            model,
            tokenizer,
            train,
            queries,
            [0],
            PBRFConfig(eps=1e-3, damping_factor=0.5, steps=3, probes=64),
            AttributionConfig(include=SMALL),
            info=info,
        )
    print(f"default damping {info['damping']:.4g} (Hutchinson) vs {want:.4g} (exact trace)")
    assert abs(info["damping"] - want) < 4 * 0.5 * info["trace_standard_error"] / 272 + 1e-12


def test_non_convergence_warns_and_is_reported():
    model, tokenizer, train, queries, lam, _ = setup()
    info: dict = {}
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        pbrf_influence(
            model,
            tokenizer,
            train,
            queries,
            [0],
            PBRFConfig(eps=1e-3, damping=lam, steps=2),
            AttributionConfig(include=SMALL),
            info=info,
        )
    assert not info["all_converged"] and info["rows"][0]["solves"][0]["relative_grad"] > 1e-6


def test_adam_minibatch_moves_toward_the_solution():
    model, tokenizer, train, queries, lam, _ = setup()
    attribution = AttributionConfig(include=SMALL)
    target = pbrf_influence(model, tokenizer, train, queries, [2], PBRFConfig(eps=1e-3, damping=lam), attribution)
    errors = []
    for steps in (5, 60):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            got = pbrf_influence(
                model,
                tokenizer,
                train,
                queries,
                [2],
                PBRFConfig(eps=1e-3, damping=lam, optimizer="adam", lr=0.05, steps=steps, batch_size=6),
                attribution,
            )
        errors.append(float((got - target).norm() / target.norm()))
    print(f"adam (batch 6 of 12, lr 0.05) vs L-BFGS: relative error {errors[0]:.2f} at 5 steps, {errors[1]:.3f} at 60")
    assert errors[1] < errors[0]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"eps": 0.0}, "eps"),
        ({"damping": -1.0}, "damping"),
        ({"damping": 0.0}, "damping"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 4}, "batch_size"),
        ({"tol": 0.0}, "tol"),
    ],
)
def test_bad_config_raises(config, message):
    with pytest.raises(ValueError, match=message):
        PBRFConfig(**config)


def test_bad_rows_and_inputs_raise():
    model, tokenizer, train, queries, lam, _ = setup()
    config, attribution = PBRFConfig(damping=lam), AttributionConfig(include=SMALL)
    for rows, message in (
        ([], "at least one"),
        ([12], "out of range"),
        (["nope"], "no training row"),
        ([1.5], "int indices"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            pbrf_influence(model, tokenizer, train, queries, rows, config, attribution)
    with pytest.raises(ValueError, match="reduction"):
        pbrf_influence(
            model, tokenizer, train, queries, [0], config, AttributionConfig(include=SMALL, reduction="mean")
        )
    with pytest.raises(ValueError, match="queries"):
        pbrf_influence(model, tokenizer, train, [], [0], config, attribution)


def test_float64_option_solves_on_a_double_copy():
    _, tokenizer, train, queries, lam, _ = setup()
    single = build_model("gpt2")  # float32
    before = _state(single)
    config, attribution = PBRFConfig(eps=1e-3, damping=lam, tol=1e-6), AttributionConfig(include=SMALL)
    got = pbrf_influence(single, tokenizer, train, queries, [5], replace(config, float64=True), attribution)
    want = pbrf_influence(build_model("gpt2").double(), tokenizer, train, queries, [5], config, attribution)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    assert next(single.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in _state(single).items())


def test_pbrf_options_are_converted_as_every_method_option_is():
    """``pbrf_config`` checks with ``core.options.check_options`` (it had its own type check): an int given for a
    float option is that float, so ``lr=1`` and ``lr=1.0`` key the same cached PBRF rows (they keyed two), and
    text is read as JSON as for a method's options (``"0.5"`` was a ``TypeError`` from a comparison)."""
    keys = {json.dumps(asdict(pbrf_config(given)), sort_keys=True) for given in ({"lr": 1}, {"lr": 1.0}, {"lr": "1"})}
    assert len(keys) == 1
    assert pbrf_config({"eps": "null", "damping": "0.5"}) == PBRFConfig(eps=None, damping=0.5)
    with pytest.raises(ValueError, match=r"option 'steps' got 10{30}: 10{30} is outside the 64-bit integers"):
        pbrf_config({"steps": 10**30})  # taken, then a tensor or range of that size overflowed
