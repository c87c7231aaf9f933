"""Curvature strategies against exact damped GGN/Fisher inverses.

Tolerances: exactness cases (one example of one token) hold to float32 round-off amplified by the
damped matrix's condition number (about dim / 0.1 = 600 here): rtol 1e-3.
Approximation quality on tiny models is a Spearman floor measured with seeded data; the measured
values are printed (``pytest -s``) and recorded in the README.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.func import functional_call, jacrev, vmap

from tests.conftest import build_model, make_records
from wherefrom.core.gradients import per_example_gradients
from wherefrom.core.tracking import select_modules
from wherefrom.curvature import load_curvature, make_curvature
from wherefrom.engine.api import AttributionConfig, Attributor


def mlp(seed: int = 0, d_in: int = 6, hidden: int = 8, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def mlp_batch(n: int, seed: int, d_in: int = 6, classes: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = (x[:, :classes] + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return {"x": x, "y": y}


def mlp_loss(sample: bool = False, seed: int = 0):
    """Per-example cross-entropy ``(B,)``; ``sample=True`` draws labels from the model (true Fisher)."""
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(model, batch):
        logits = model(batch["x"])
        y = batch["y"]
        if sample:
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        return F.cross_entropy(logits, y, reduction="none")

    return loss_fn


def block_damped_inverse(blocks: dict[str, torch.Tensor], damping_factor: float = 0.1) -> dict[str, torch.Tensor]:
    """``(F_m + 0.1 * trace(F_m)/dim I)^-1`` per module block (float64)."""
    out = {}
    for name, block in blocks.items():
        lam = damping_factor * torch.trace(block) / block.shape[0]
        out[name] = torch.linalg.inv(block + lam * torch.eye(block.shape[0], dtype=block.dtype))
    return out


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kronecker_is_exact_for_one_example_of_one_token(strategy):
    model = mlp()
    modules = select_modules(model, include=[r"^\d+$"])
    batch = mlp_batch(1, seed=3)
    loss_fn = mlp_loss()
    curvature = make_curvature(strategy).fit(model, modules, lambda: [batch], loss_fn)
    grads = per_example_gradients(model, modules, batch, loss_fn)
    fisher = {n: g.flatten(1).double().T @ g.flatten(1).double() for n, g in grads.items()}
    inverse = block_damped_inverse(fisher)
    v = {n: torch.randn(3, *g.shape[1:]) for n, g in grads.items()}
    pre = curvature.precondition(v)
    for name in grads:
        expected = (v[name].flatten(1).double() @ inverse[name]).reshape(v[name].shape).float()
        torch.testing.assert_close(pre[name], expected, rtol=1e-3, atol=1e-5)


def exact_mlp_fisher(model: nn.Module, modules, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """True Fisher (= GGN for softmax cross-entropy) per module block, by per-sample Jacobians."""
    params = {f"{m.name}.{s}": p.detach() for m in modules for s, p in zip(("weight", "bias"), m.parameters())}

    def log_probs(p, xi):
        return F.log_softmax(functional_call(model, p, (xi[None],))[0], -1)

    jac = vmap(jacrev(log_probs), in_dims=(None, 0))(params, x)  # name -> (n, C, *shape)
    probs = torch.softmax(model(x), -1).detach()
    blocks = {}
    for m in modules:
        dense = m.from_param_layout(jac[f"{m.name}.weight"], jac.get(f"{m.name}.bias"))  # (n, C, out, in')
        rows = (dense.flatten(2) * probs.sqrt().unsqueeze(-1)).double().flatten(0, 1)
        blocks[m.name] = rows.T @ rows / x.shape[0]
    return blocks


@dataclass
class MLPProblem:
    """DESIGN.md's MLP check: 512 training rows, 16 queries, the exact damped block Fisher scores."""

    model: nn.Module
    modules: list
    train: dict[str, torch.Tensor]
    query: dict[str, torch.Tensor]
    chunks: list[dict[str, torch.Tensor]]  # fitting batches, 4 passes = 4 label samples per row
    train_grads: dict[str, torch.Tensor]
    query_grads: dict[str, torch.Tensor]
    exact: torch.Tensor  # (16, 512) scores with the exact damped module-block true Fisher


def trained_mlp_problem() -> MLPProblem:
    model = mlp(seed=1, d_in=8, hidden=16)
    train, query = mlp_batch(512, seed=4, d_in=8), mlp_batch(16, seed=5, d_in=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(train["x"]), train["y"]).backward()
        opt.step()
    modules = select_modules(model, include=[r"^\d+$"])
    chunks = [{k: v[i : i + 64] for k, v in train.items()} for i in range(0, 512, 64)] * 4
    train_grads = per_example_gradients(model, modules, train, mlp_loss())
    query_grads = per_example_gradients(model, modules, query, mlp_loss())
    inverse = block_damped_inverse(exact_mlp_fisher(model, modules, train["x"]))
    exact = sum(
        (query_grads[n].flatten(1).double() @ inverse[n]) @ train_grads[n].flatten(1).double().T for n in inverse
    )
    return MLPProblem(model, modules, train, query, chunks, train_grads, query_grads, exact)


def test_ekfac_matches_kronfluence_measured_faithfulness_on_mlp():
    """DESIGN.md: kronfluence reached Spearman 0.67 (ekfac) / 0.66 (kfac) vs the exact block Fisher on an
    MLP with 512 examples. Here (4 sampled labels per example) ekfac 0.672, kfac 0.682: on this MLP
    the eigenvalue correction buys nothing over K-FAC (both are limited by the Kronecker structure);
    the tiny-LM test below shows where it does. Head-to-head with kronfluence: tests/curvature/test_kronfluence_parity.py."""
    p = trained_mlp_problem()
    measured = {}
    for strategy in ("ekfac", "kfac", "diagonal", "identity"):
        curvature = make_curvature(strategy).fit(p.model, p.modules, lambda: p.chunks, mlp_loss(sample=True, seed=7))
        pre = curvature.precondition(p.query_grads)
        scores = sum(pre[n].flatten(1) @ p.train_grads[n].flatten(1).T for n in pre)
        measured[strategy] = spearmanr(scores.flatten(), p.exact.flatten()).statistic
    print("Spearman vs exact block-diagonal Fisher (MLP, 512 examples):", measured)
    assert measured["ekfac"] >= 0.67 and measured["kfac"] >= 0.66
    assert measured["ekfac"] >= measured["kfac"] - 0.02
    assert measured["ekfac"] > measured["diagonal"] > measured["identity"] - 0.05


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_ekfac_tracks_exact_ggn_on_tiny_lm(kind, tokenizer):
    model = build_model(kind)
    train, queries = make_records(24, seed=11), make_records(6, seed=12, prefix="q")
    results, preconditioned = {}, {}
    for strategy in ("exact", "ekfac", "kfac", "identity"):
        attributor = Attributor(model, tokenizer, AttributionConfig(strategy=strategy, batch_size=8))
        attributor.fit(train)
        results[strategy] = attributor.scores(queries, train).total.flatten()
        _, preconditioned[strategy] = attributor.preconditioned_queries(queries)
    exact_flat = torch.cat([v.flatten() for v in preconditioned["exact"].values()])
    report = {}
    for strategy in ("ekfac", "kfac", "identity"):
        approx = torch.cat([v.flatten() for v in preconditioned[strategy].values()])
        report[strategy] = {
            "spearman": round(spearmanr(results[strategy], results["exact"]).statistic, 3),
            "ihvp_rel_error": round(float((approx - exact_flat).norm() / exact_flat.norm()), 3),
        }
    print(f"{kind}: vs exact block GGN", report)
    assert report["ekfac"]["spearman"] >= 0.85
    assert report["ekfac"]["spearman"] >= report["kfac"]["spearman"]
    assert report["ekfac"]["spearman"] > report["identity"]["spearman"]
    assert report["ekfac"]["ihvp_rel_error"] < report["identity"]["ihvp_rel_error"]


def test_save_load_roundtrip_and_selection_check(tmp_path, tokenizer, train_records):
    model = build_model("llama")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="ekfac", batch_size=4))
    fitted = attributor.fit(train_records)
    fitted.save(tmp_path / "factors")
    loaded = load_curvature(tmp_path / "factors")
    assert loaded.name == "ekfac" and loaded.modules == fitted.modules
    grads = next(attributor.gradients(train_records))[1]
    for name, value in fitted.precondition(grads).items():
        torch.testing.assert_close(loaded.precondition(grads)[name], value)
    other = Attributor(model, tokenizer, AttributionConfig(strategy="ekfac", include=["mlp"]))
    with pytest.raises(ValueError, match="different module selection"):
        other.use_curvature(loaded)


def test_absolute_damping_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown strategy"):
        make_curvature("nope")
    with pytest.raises(ValueError, match=r"'ekfac' has no option\(s\) \['rank'\]"):
        make_curvature("ekfac", rank=3)
    with pytest.raises(ValueError, match="damping"):
        make_curvature("ekfac", damping=-1.0)
    model = mlp()
    modules = select_modules(model, include=[r"^\d+$"])
    batch = mlp_batch(8, seed=0)
    curvature = make_curvature("ekfac", damping=0.25).fit(model, modules, lambda: [batch], mlp_loss())
    assert all(float(curvature.state[f"{m.name}.damping"]) == 0.25 for m in modules)


def test_exact_hessian_option_matches_double_backward(tokenizer):
    """``exact`` with ``curvature="hessian"``: H v equals an autograd Hessian-vector product of the mean loss."""
    from wherefrom.core.encoding import collate, pad_id
    from wherefrom.core.task import per_example_loss
    from wherefrom.curvature.exact import eager_attention

    model = build_model("lora").double()
    train = make_records(6, seed=3)
    attributor = Attributor(model, tokenizer, AttributionConfig(batch_size=3))
    # absolute damping: this Hessian's trace is negative, so the relative damping is refused by name
    curvature = attributor.fit(train, make_curvature("exact", damping=1.0, blocks="full", curvature="hessian"))
    hessian = curvature.state["full.matrix"].double()
    batch = collate(attributor.encode(train), pad_id(tokenizer))
    params = [p for m in attributor.modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    with eager_attention(model):  # SDPA has no double backward on CPU
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = per_example_loss(logits, batch["labels"]).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([m.from_param_layout(g, None).flatten() for m, g in zip(attributor.modules, grads)])
    v = torch.randn(flat_grad.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hv = torch.autograd.grad(flat_grad @ v, params)
    expected = torch.cat([m.from_param_layout(h, None).flatten() for m, h in zip(attributor.modules, hv)])
    torch.testing.assert_close(hessian @ v, expected, rtol=1e-4, atol=1e-6)
    assert "negative_eigenvalues" in curvature.info

    float32 = Attributor(build_model("llama"), tokenizer, AttributionConfig(include=[r"mlp\.down_proj"]))
    fitted = float32.fit(
        train, make_curvature("exact", damping=1.0, curvature="hessian")
    )  # differentiates in the model's dtype
    assert all(torch.isfinite(v).all() for v in fitted.state.values())


def test_exact_refuses_infeasible_sizes_with_the_byte_count(tokenizer, train_records, monkeypatch):
    monkeypatch.setenv("WHEREFROM_MEMORY_LIMIT", "1024")  # the shared limit of wherefrom.core.memory
    attributor = Attributor(build_model("llama"), tokenizer, AttributionConfig(strategy="exact"))
    parameters = sum(m.shape[0] * m.shape[1] for m in attributor.modules)
    with pytest.raises(
        MemoryError, match=rf"dense GGN over {parameters:,} parameters \(P x P, float64\): {8 * parameters**2:,} bytes"
    ):
        attributor.fit(train_records)


def test_exact_ggn_is_the_same_in_forward_and_reverse_mode(tokenizer, monkeypatch):
    """``exact`` builds each Jacobian in whichever mode needs fewer passes (here P=256 tangents against
    t x V = 56 t outputs: forward for rows with t > 4 completion tokens); forcing either mode gives the same GGN to float64 round-off."""
    from torch.func import jacfwd

    import wherefrom.curvature.exact as exact_module

    attributor = Attributor(
        build_model("llama").double(), tokenizer, AttributionConfig(batch_size=3, include=[r"k_proj", r"v_proj"])
    )
    train = make_records(6, seed=3)

    def ggn(mode) -> torch.Tensor:
        monkeypatch.setattr(exact_module, "jacfwd", mode)
        monkeypatch.setattr(exact_module, "jacrev", mode)
        return attributor.fit(train, make_curvature("exact", blocks="full")).state["full.matrix"]

    chosen = attributor.fit(train, make_curvature("exact", blocks="full")).state["full.matrix"]
    forward, reverse = ggn(jacfwd), ggn(jacrev)
    torch.testing.assert_close(forward, reverse, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(chosen, forward, rtol=1e-6, atol=1e-8)  # rows with t x V < P took reverse mode


def test_ekfac_empirical_damping_is_the_reference_rule_by_hand():
    """The reference study's damping, ``lambda = mean over rows of mean(g^2) / 10`` per block
    (``calculate_lambda_const`` with ``lambda_const_param=10``), is EK-FAC's default rule on the empirical
    Fisher: its corrected eigenvalues average to ``mean_n ||G_n||^2 / P``. Checked against per-example
    gradients of the reference layout's loss (every token labelled, left-padded)."""
    from wherefrom.models.tiny import tiny_tokenizer

    model = build_model("lora").double()
    config = AttributionConfig(strategy="ekfac", fisher="empirical", pad_left=True, loss_tokens="all", max_length=64)
    attributor = Attributor(model, tiny_tokenizer(), config)
    records = make_records(6, seed=3)
    curvature = attributor.fit(records)
    grads: dict[str, list[torch.Tensor]] = {}
    for _, batch in attributor.gradients(records):
        for name, g in batch.items():
            grads.setdefault(name, []).append(g.double())
    for name, parts in grads.items():
        g = torch.cat(parts)
        by_hand = float(g.pow(2).flatten(1).mean(1).mean()) / 10
        assert by_hand > 0
        assert float(curvature.state[f"{name}.damping"]) == pytest.approx(by_hand, rel=1e-6)


def test_equal_factors_are_decomposed_once_with_the_same_result(tmp_path, tokenizer, train_records):
    """q/k/v projections read one input: their A factors are equal and decomposed once (equal copies in the state,
    which save and load: no shared memory); a different matrix is decomposed anew."""
    from wherefrom.curvature.kronecker import Decompositions

    model = build_model("llama")
    attributor = Attributor(model, tokenizer, AttributionConfig(strategy="kfac", include=[r"self_attn\.[qkv]_proj"]))
    fitted = attributor.fit(train_records)
    names = attributor.module_names
    vectors = [fitted.state[f"{n}.a_eigvecs"] for n in names]
    assert all(torch.equal(v, vectors[0]) for v in vectors) and vectors[0].data_ptr() != vectors[1].data_ptr()
    calls = []
    decompose = Decompositions()
    original = torch.linalg.eigh
    try:
        torch.linalg.eigh = lambda m: calls.append(1) or original(m)
        matrix = torch.randn(5, 5, dtype=torch.float64)
        first, again = decompose(matrix @ matrix.T, 3), decompose((matrix @ matrix.T).clone(), 3)
        decompose(matrix @ matrix.T, 2)
    finally:
        torch.linalg.eigh = original
    assert len(calls) == 2 and all(torch.equal(x, y) for x, y in zip(first, again))
    fitted.save(tmp_path)
    loaded = load_curvature(tmp_path)
    assert all(torch.equal(loaded.state[k], v) for k, v in fitted.state.items())


def test_modules_fed_one_input_share_one_covariance_sum(tmp_path, tokenizer, train_records):
    """q/k/v read one input: one float64 ``a^T a`` sum between them (one tensor), equal bit for bit to the sum
    of a pass that tracks q alone; the covariance stage writes it under each name and reads back equal values."""
    from wherefrom.core.store import StageFolder
    from wherefrom.curvature.base import no_progress
    from wherefrom.curvature.kronecker import KFAC, model_factors

    model = build_model("llama")
    attributor = Attributor(
        model, tokenizer, AttributionConfig(fisher="empirical", include=[r"self_attn\.[qkv]_proj", r"mlp\.down_proj"])
    )

    def sums(modules):
        batches = lambda: attributor.batches(train_records).without_ids()  # noqa: E731
        stream = model_factors(model, modules, batches, attributor.train_loss_fn(), no_progress, "covariances")
        return KFAC.covariance_sums(stream, {m.name: tuple(m.shape) for m in modules})[0]

    together = sums(attributor.modules)
    layer = [m.name for m in attributor.modules if m.name.startswith("model.layers.0.")]
    q, k, v, down = (next(n for n in layer if part in n) for part in ("q_proj", "k_proj", "v_proj", "down_proj"))
    assert together[f"{q}.a_cov"] is together[f"{k}.a_cov"] is together[f"{v}.a_cov"]
    assert together[f"{down}.a_cov"] is not together[f"{q}.a_cov"]
    alone = sums([m for m in attributor.modules if m.name == q])
    assert torch.equal(alone[f"{q}.a_cov"], together[f"{q}.a_cov"])
    stages = StageFolder(tmp_path)
    stages.save("covariances", together, {})
    loaded, _ = stages.load("covariances")
    assert loaded.keys() == together.keys() and all(torch.equal(loaded[n], t) for n, t in together.items())


def test_shared_sums_split_when_modules_take_different_addends():
    """The accumulators of :func:`shared_sums`: one between modules that take the same addend; a batch where
    they take different ones (or one is absent) copies the shared sum first, so every module's total is its own."""
    from wherefrom.curvature.kronecker import shared_sums

    sums: dict[str, torch.Tensor] = {}
    expected = dict.fromkeys("abc", 0.0)

    def add(names, value):
        addend = torch.tensor(value)
        for total in shared_sums(sums, names, addend):
            total += addend
        for n in names:
            expected[n] += value

    add(["a", "b", "c"], 1.0)
    assert sums["a"] is sums["b"] is sums["c"]
    add(["a", "b"], 2.0)  # c absent from this batch
    add(["a"], 4.0)
    add(["b", "c"], 8.0)
    assert sums["a"] is not sums["b"] and sums["b"] is not sums["c"]
    assert {n: float(t) for n, t in sums.items()} == expected == {"a": 7.0, "b": 11.0, "c": 9.0}
