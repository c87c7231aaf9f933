"""Iterative iHVP strategies (``cg``, ``lissa``, ``arnoldi``) and the matrix-free GGN operator, against
``ExactGGN(blocks="full")`` (dense GGN over all tracked modules, cross-module terms included) at the
same absolute damping.

Setup: tiny Llama (``k_proj`` + ``v_proj``, P=256, two modules), GPT-2 (``attn.c_proj``, a ``Conv1D``
with bias, P=272) and LoRA-on-Llama (every LoRA A/B matrix, P=112) in float64, 8 training rows of varying
length (padded) and 4 random vectors. ``lambda_0`` is the default rule ``0.1 x trace(G) / P`` (computed
exactly by ``ExactGGN``: ``lambda_max / lambda_0`` is about 250-500 here, G has rank ~200 of P);
``lambda_1 = 0.2 x lambda_max`` for LiSSA, whose depth grows like ``lambda_max / lambda``.

Tolerances, as relative Frobenius errors of the preconditioned vectors (the eager attention of the
tiny Llama takes its softmax in float32, so products are good to ~1e-8 relative, not 1e-16):

* ``GGNOperator.matvec`` vs ``G v`` (``G`` stored in float32 by ExactGGN): < 1e-6 (measured ~3e-8).
* ``cg`` (tol 1e-8) at ``lambda_0``: < 1e-5 (measured 2.4e-9 .. 2.1e-8; 34-105 iterations).
* ``lissa`` (deterministic, full batch, its error bound ``tol`` 3e-4) at ``lambda_1``: < 1e-3.
* ``arnoldi`` at full rank, and at rank ``rank(G) + 4`` with ``complement=True``: < 1e-5 (measured
  1e-8 and 5e-7).
* Attributor scores (float32 model) with each strategy vs exact-full scores: Pearson > 0.99.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import pytest
import torch

from tests.conftest import build_model, make_records
from wherefrom.core.encoding import encode_records, iterate_batches, pad_id
from wherefrom.core.gradients import per_example_gradients
from wherefrom.core.task import LanguageModelingTask
from wherefrom.core.tracking import select_modules
from wherefrom.curvature import (
    ConvergenceWarning,
    ExactGGN,
    FisherOperator,
    GGNOperator,
    load_curvature,
    make_curvature,
)
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.models.tiny import tiny_tokenizer

KINDS = ["llama", "gpt2", "lora"]
SELECTIONS = {"llama": [r"k_proj", r"v_proj"], "gpt2": [r"attn\.c_proj"], "lora": None}


@dataclass
class Setup:
    model: torch.nn.Module
    modules: list
    data: list
    exact: ExactGGN  # default damping rule: lambda_0
    lam0: float
    lam1: float
    rank: int  # numerical rank of G
    vectors: dict[str, torch.Tensor]

    def batches(self):
        return self.data

    def flat(self, vectors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([vectors[m.name].flatten(1) for m in self.modules], dim=1)

    def error(self, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
        want_flat = self.flat(want)
        return float((self.flat(got) - want_flat).norm() / want_flat.norm())


@functools.cache
def setup(kind: str) -> Setup:
    model = build_model(kind).double()
    modules = select_modules(model, include=SELECTIONS[kind])
    tokenizer = tiny_tokenizer()
    encoded = encode_records(make_records(8, seed=1), tokenizer, 64, False)
    data = [batch for _, batch in iterate_batches(encoded, 8, pad_id(tokenizer))]
    exact = ExactGGN(blocks="full").fit(model, modules, lambda: data, None)
    eigenvalues = torch.linalg.eigvalsh(exact.state["full.matrix"].double())
    generator = torch.Generator().manual_seed(0)
    vectors = {m.name: torch.randn(4, *m.shape, generator=generator, dtype=torch.float64) for m in modules}
    return Setup(
        model,
        modules,
        data,
        exact,
        lam0=float(exact.state["full.damping"]),
        lam1=0.2 * float(eigenvalues[-1]),
        rank=int((eigenvalues > 1e-8 * eigenvalues[-1]).sum()),
        vectors=vectors,
    )


def fit(s: Setup, strategy: str, **options):
    return make_curvature(strategy, **options).fit(s.model, s.modules, s.batches, None)


@pytest.mark.parametrize("kind", KINDS)
def test_operator_matches_exact_full_ggn(kind):
    s = setup(kind)
    operator = GGNOperator(s.model, s.modules, s.batches)
    assert operator.num_parameters == s.exact.state["full.matrix"].shape[0]
    product = operator.matvec(s.vectors)
    expected = s.flat(s.vectors) @ s.exact.state["full.matrix"].double()
    error = float((s.flat(product) - expected).norm() / expected.norm())
    print(f"{kind}: matvec relative error {error:.1e}")
    assert error < 1e-6
    subset = operator.matvec_flat(s.flat(s.vectors), examples=operator.examples)  # all examples, by index
    torch.testing.assert_close(subset, s.flat(product), rtol=1e-10, atol=1e-14)
    trace, standard_error = operator.trace(probes=32, seed=0)
    exact_trace = float(torch.trace(s.exact.state["full.matrix"].double()))
    print(f"{kind}: Hutchinson trace {trace:.4g} +- {standard_error:.2g}, exact {exact_trace:.4g}")
    assert abs(trace - exact_trace) < 4 * standard_error
    mean, estimate = operator.mean_eigenvalue(probes=32, seed=0)
    assert estimate == {"trace_estimate": trace, "trace_standard_error": standard_error}
    assert mean == trace / operator.num_parameters


@pytest.mark.parametrize("kind", KINDS)
def test_cg_reaches_exact_damped_inverse(kind):
    s = setup(kind)
    cg = fit(s, "cg", damping=s.lam0, tol=1e-8, max_iter=400)
    error = s.error(cg.precondition(s.vectors), s.exact.precondition(s.vectors))
    report = cg.info["last_solve"]
    print(
        f"{kind}: cg error {error:.1e}, {report['iterations']} iterations, residual {report['relative_residual']:.1e}"
    )
    assert error < 1e-5
    assert report["converged"] and report["relative_residual"] < 1e-6 and report["iterations"] <= cg.info["parameters"]


@pytest.mark.parametrize("kind", KINDS)
def test_lissa_reaches_exact_damped_inverse(kind):
    s = setup(kind)
    exact = ExactGGN(blocks="full", damping=s.lam1).fit(s.model, s.modules, s.batches, None)
    lissa = fit(s, "lissa", damping=s.lam1, tol=3e-4)
    error = s.error(lissa.precondition(s.vectors), exact.precondition(s.vectors))
    report = lissa.info["last_solve"]
    print(f"{kind}: lissa error {error:.1e} (bound {report['relative_error_bound']:.1e}), depth {report['iterations']}")
    assert report["converged"] and not report["diverged"]
    assert error <= report["relative_error_bound"] * 1.01 + 1e-12 and error < 1e-3


@pytest.mark.parametrize("kind", ["llama", "lora"])
def test_lissa_reference_sign_is_the_closed_form_of_its_recursion(kind):
    """``damping_sign="reference"``: ``alpha r_J`` with ``r_j = v + (I - alpha (G - lambda I)) r_{j-1}``, i.e.
    ``alpha sum_{j<=J} (I - alpha (G - lambda I))^j v`` from the dense G; at the reference's scale 1e-3 and
    depth 3 it is ``~ 4 alpha v`` (gradient similarity), and it differs from the correct sign's recursion."""
    s = setup(kind)
    G = s.exact.state["full.matrix"].double()
    lam, alpha, depth = s.lam1, 0.5 / float(torch.linalg.eigvalsh(G)[-1]), 3
    step = torch.eye(G.shape[0], dtype=torch.float64) - alpha * (G - lam * torch.eye(G.shape[0], dtype=torch.float64))
    v = s.flat(s.vectors)
    expected, power = torch.zeros_like(v), v.clone()
    for _ in range(depth + 1):
        expected, power = expected + power, power @ step
    reference = fit(s, "lissa", damping=lam, scale=alpha, depth=depth, damping_sign="reference")
    got = s.flat(reference.precondition(s.vectors))
    assert float((got - alpha * expected).norm() / (alpha * expected).norm()) < 1e-6
    correct = fit(s, "lissa", damping=lam, scale=alpha, depth=depth, tol=1e-30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # depth 3 never converges
        other = s.flat(correct.precondition(s.vectors))
    assert float((other - got).norm() / got.norm()) > 1e-2  # the sign of lambda matters here
    tiny = fit(
        s, "lissa", damping=lam, scale=1e-3 / float(torch.linalg.eigvalsh(G)[-1]), depth=3, damping_sign="reference"
    )
    small = s.flat(tiny.precondition(s.vectors))
    four_v = 4 * float(tiny.state["scale"]) * v
    assert float((small - four_v).norm() / four_v.norm()) < 1e-2


def train_loss(model, batch):
    """The summed completion-token loss with the data's labels (the empirical Fisher's loss)."""
    return LanguageModelingTask().train_loss(model, batch)


@pytest.mark.parametrize("kind", ["llama", "lora"])
def test_fisher_operator_is_the_mean_outer_product_of_per_example_gradients(kind, tmp_path):
    """``curvature="fisher"`` multiplies by ``G_emp = mean_n g_n g_n^T`` of the training loss's per-example
    gradients (formed densely here from :func:`per_example_gradients`): its products, exact trace and default
    damping; CG solves ``(G_emp + lambda I) x = v`` to 1e-6; the reference study's LiSSA on it is the closed form
    of its recursion with ``G_emp`` (what the reference code computed from its cached gradients); saved and
    loaded, it re-attaches with the fitting loss and gives the same solve, and refuses to attach without it."""
    s = setup(kind)
    g = torch.cat([s.flat(per_example_gradients(s.model, s.modules, batch, train_loss)) for batch in s.data])
    G = g.T @ g / g.shape[0]
    v = s.flat(s.vectors)
    operator = FisherOperator(s.model, s.modules, s.batches, train_loss)
    torch.testing.assert_close(operator.matvec_flat(v), v @ G, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(operator.matvec_flat(v, operator.examples[:3]), v @ (g[:3].T @ g[:3]) / 3)
    assert operator.trace() == (pytest.approx(float(torch.trace(G)), rel=1e-12), 0.0)

    lam = 0.2 * float(torch.linalg.eigvalsh(G)[-1])
    solved = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64), v.T).T
    cg = make_curvature("cg", damping=lam, tol=1e-10, max_iter=500, curvature="fisher")
    cg.fit(s.model, s.modules, s.batches, train_loss)
    got = s.flat(cg.precondition(s.vectors))
    assert float((got - solved).norm() / solved.norm()) < 1e-6
    default = make_curvature("cg", curvature="fisher").fit(s.model, s.modules, s.batches, train_loss)
    assert default.lam == pytest.approx(0.1 * float(torch.trace(G)) / G.shape[0], rel=1e-10)

    alpha, depth = 1e-3 / float(torch.linalg.eigvalsh(G)[-1]), 3
    step = torch.eye(G.shape[0], dtype=torch.float64) - alpha * (G - lam * torch.eye(G.shape[0], dtype=torch.float64))
    expected, power = torch.zeros_like(v), v.clone()
    for _ in range(depth + 1):
        expected, power = expected + power, power @ step
    reference = make_curvature(
        "lissa", damping=lam, scale=alpha, depth=depth, damping_sign="reference", curvature="fisher"
    ).fit(s.model, s.modules, s.batches, train_loss)
    got = s.flat(reference.precondition(s.vectors))
    assert float((got - alpha * expected).norm() / (alpha * expected).norm()) < 1e-9

    cg.save(tmp_path / "cg")
    with pytest.raises(ValueError, match="curvature='fisher' needs the fitting loss"):
        load_curvature(tmp_path / "cg").attach(s.model, s.modules, s.batches)
    again = load_curvature(tmp_path / "cg").attach(s.model, s.modules, s.batches, loss_fn=train_loss)
    torch.testing.assert_close(s.flat(again.precondition(s.vectors)), s.flat(cg.precondition(s.vectors)))


@pytest.mark.parametrize("kind", KINDS)
def test_arnoldi_full_rank_and_complement_are_exact(kind):
    s = setup(kind)
    expected = s.exact.precondition(s.vectors)
    size = s.exact.state["full.matrix"].shape[0]
    full = fit(s, "arnoldi", damping=s.lam0, rank=size, block_size=8, max_vectors=8)
    complement = fit(s, "arnoldi", damping=s.lam0, rank=s.rank + 4, block_size=8, max_vectors=8, complement=True)
    errors = {
        "full": s.error(full.precondition(s.vectors), expected),
        "complement": s.error(complement.precondition(s.vectors), expected),
    }
    print(f"{kind}: arnoldi errors {errors} (rank(G) = {s.rank} of {size}, restarts {full.info['restarts']})")
    assert errors["full"] < 1e-5 and errors["complement"] < 1e-5
    # the top eigenvalues are G's
    top = torch.linalg.eigvalsh(s.exact.state["full.matrix"].double()).flip(0)[:5]
    torch.testing.assert_close(torch.tensor(full.info["top_eigenvalues"], dtype=torch.float64), top, rtol=1e-5, atol=0)
    # Schioppa et al.'s projection (no complement) loses the rest of v: far from exact at low rank
    with pytest.warns(ConvergenceWarning, match="not converged"):  # 16 steps: the 8th pair is rough
        low = fit(s, "arnoldi", damping=s.lam0, rank=8, block_size=8, max_vectors=8)
    assert s.error(low.precondition(s.vectors), expected) > 0.5


def test_lissa_error_falls_with_depth_and_divergence_warns():
    s = setup("llama")
    expected = ExactGGN(blocks="full", damping=s.lam1).fit(s.model, s.modules, s.batches, None).precondition(s.vectors)
    errors = []
    scale = None
    for depth in (4, 16, 48):
        lissa = make_curvature("lissa", damping=s.lam1, depth=depth, tol=1e-12, scale=scale)
        lissa.fit(s.model, s.modules, s.batches, None)
        scale = float(lissa.state["scale"])
        with pytest.warns(ConvergenceWarning, match="did not converge"):
            errors.append(s.error(lissa.precondition(s.vectors), expected))
    print("lissa error by depth 4/16/48:", [f"{e:.1e}" for e in errors])
    assert errors[0] > errors[1] > errors[2]
    too_large = 2.5 / (s.lam1 / 0.2)  # alpha * (lambda_max + lambda) > 2: |1 - alpha mu| > 1
    lissa = fit(s, "lissa", damping=s.lam1, depth=500, scale=too_large)
    with pytest.warns(ConvergenceWarning, match="diverged"):
        lissa.precondition(s.vectors)
    report = lissa.info["last_solve"]
    assert report["diverged"] and not report["converged"] and report["iterations"] < 500


def test_stochastic_lissa_is_seeded_and_close():
    s = setup("lora")
    expected = ExactGGN(blocks="full", damping=s.lam1).fit(s.model, s.modules, s.batches, None).precondition(s.vectors)
    lissa = fit(s, "lissa", damping=s.lam1, batch_size=4, depth=30, seed=3, power_iterations=5)
    runs = []
    for _ in range(2):  # each solve replays the same seeded mini-batch sequence
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # a mini-batch recursion has a noise floor
            runs.append(lissa.precondition(s.vectors))
    error = s.error(runs[0], expected)
    print(f"stochastic lissa (4 of 8 rows per step, depth 30): error {error:.2e}")
    assert s.error(runs[1], runs[0]) == 0.0
    assert error < 0.1


def test_hessian_option_matches_finite_differences():
    s = setup("gpt2")  # float64 throughout (the Llama's eager softmax is float32: too noisy for differences)
    operator = GGNOperator(s.model, s.modules, s.batches, curvature="hessian")
    v = {n: t[:1] for n, t in s.vectors.items()}
    product = s.flat(operator.matvec(v))
    task, batch = LanguageModelingTask(), s.data[0]
    count = batch["input_ids"].shape[0]

    def gradient(step: float) -> torch.Tensor:
        """Mean training-loss gradient at theta + step * v (parameters restored bit for bit after)."""
        saved = [(p, p.detach().clone()) for m in s.modules for p in m.parameters()]
        with torch.no_grad():
            for m in s.modules:
                for p, d in zip(m.parameters(), m.to_param_layout(v[m.name][0])):
                    p.add_(step * d)
        try:
            grads = per_example_gradients(s.model, s.modules, batch, lambda model, b: task.train_loss(model, b))
        finally:
            with torch.no_grad():
                for p, value in saved:
                    p.copy_(value)
        return s.flat(grads).sum(0, keepdim=True) / count

    eps = 1e-6  # truncation error ~ 2e-9 here, falls as eps^2
    expected = (gradient(eps) - gradient(-eps)) / (2 * eps)
    error = float((product - expected).norm() / expected.norm())
    ggn = GGNOperator(s.model, s.modules, s.batches).matvec_flat(s.flat(v))
    print(
        f"hessian vs finite differences {error:.1e}; |Hv - Gv| / |Hv| = {float((product - ggn).norm() / product.norm()):.2f}"
    )
    assert error < 1e-6


def test_attributor_scores_follow_exact_full_scores(tokenizer, tmp_path):
    model = build_model("llama")  # float32, as users run it
    train, queries = make_records(8, seed=1), make_records(4, seed=2, prefix="q")
    config = AttributionConfig(strategy="cg", damping=0.05, include=list(SELECTIONS["llama"]), batch_size=8)
    attributor = Attributor(model, tokenizer, config)
    attributor.fit(train)  # cg with its defaults, through the public path

    def batches():
        return (batch for _, batch in attributor.batches(train))

    scores = {"cg": attributor.scores(queries, train).total.flatten()}
    attributor.curvature.save(tmp_path / "cg")  # a saved cg comes back through use_curvature(..., train)
    _, fitted = attributor.preconditioned_queries(queries)
    attributor.use_curvature(load_curvature(tmp_path / "cg"), train)
    _, reloaded = attributor.preconditioned_queries(queries)
    for name in fitted:
        torch.testing.assert_close(reloaded[name], fitted[name])
    others = {
        "exact": make_curvature("exact", damping=0.05, blocks="full"),
        "lissa": make_curvature("lissa", damping=0.05),
        "arnoldi": make_curvature("arnoldi", damping=0.05, rank=32, block_size=8, max_vectors=8, complement=True),
    }
    for name, curvature in others.items():
        attributor.use_curvature(curvature.fit(model, attributor.modules, batches, attributor.fisher_loss_fn()))
        scores[name] = attributor.scores(queries, train).total.flatten()
    correlations = {
        k: float(torch.corrcoef(torch.stack([v, scores["exact"]]))[0, 1]) for k, v in scores.items() if k != "exact"
    }
    print("Pearson vs exact-full scores (float32 llama):", correlations)
    assert all(c > 0.99 for c in correlations.values())


def test_save_load_arnoldi_and_cg_needs_attach(tmp_path):
    s = setup("lora")
    arnoldi = fit(s, "arnoldi", damping=s.lam0, rank=s.rank + 4, block_size=8, max_vectors=8, complement=True)
    arnoldi.save(tmp_path / "arnoldi")
    loaded = load_curvature(tmp_path / "arnoldi")
    assert (loaded.rank, loaded.complement, loaded.block_size, loaded.max_vectors) == (s.rank + 4, True, 8, 8)
    again = loaded.precondition(s.vectors)  # no model, no data needed
    for name, value in arnoldi.precondition(s.vectors).items():
        torch.testing.assert_close(again[name], value)

    cg = fit(s, "cg", damping=s.lam1, tol=1e-9, max_iter=300)
    cg.save(tmp_path / "cg")
    loaded = load_curvature(tmp_path / "cg")
    assert (loaded.tol, loaded.max_iter, loaded.lam) == (1e-9, 300, s.lam1)
    with pytest.raises(RuntimeError, match=r"attach\(model, modules, batches\)"):
        loaded.precondition(s.vectors)
    again = loaded.attach(s.model, s.modules, s.batches).precondition(s.vectors)
    for name, value in cg.precondition(s.vectors).items():
        torch.testing.assert_close(again[name], value)
    with pytest.raises(ValueError, match="different module selection"):
        load_curvature(tmp_path / "cg").attach(s.model, s.modules[:1], s.batches)

    s.exact.save(tmp_path / "exact")  # ExactGGN's top-level ``blocks`` still round-trips
    assert load_curvature(tmp_path / "exact").blocks == "full"
