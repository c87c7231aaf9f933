"""``diagnose``: one damping for every method and the exact reference, and progress over the methods."""

from __future__ import annotations

import json

import pytest

from tests.conftest import build_model, make_records
from wherefrom.engine.api import AttributionConfig
from wherefrom.studies.diagnose import diagnose, fit_reference, shared_damping


@pytest.fixture(scope="module")
def setup(tokenizer):
    return build_model("lora"), make_records(10, seed=21), make_records(3, seed=22, prefix="q")


def test_every_method_gets_the_damping_of_the_exact_reference(setup, tokenizer):
    model, train, queries = setup
    config = AttributionConfig(batch_size=5)
    seen = []

    def progress(items, description):
        seen.append((description, len(items)))
        return iter(items)

    rows, reason = diagnose(model, tokenizer, train, queries, ["ekfac", "kfac", "gradsim"], config, progress=progress)
    # the loop over methods, then each method's own passes (they reported none: make_method took no progress)
    assert (
        reason is None
        and seen[0] == ("methods", 3)
        and {d for d, _ in seen[1:]} >= {"shared pass (covariances, correction, train)"}
    )
    reference = fit_reference(model, tokenizer, train, config, "exact", blocks="full")
    expected = shared_damping(reference.curvature, 0.1)
    assert expected == pytest.approx(float(reference.curvature.state["full.damping"]), rel=1e-6)
    assert all(r.damping == pytest.approx(expected, rel=1e-9) for r in rows)
    by_name = {r.method: r for r in rows}
    # Measured here: EK-FAC 1.30 (Spearman 0.83) at the shared damping; 668 (Spearman 0.50) at its own
    # per-module default, which differs from the reference's by the damping alone.
    assert by_name["ekfac"].ihvp_rel_error < 2 and by_name["ekfac"].spearman > 0.7
    fixed, _ = diagnose(model, tokenizer, train, queries, ["ekfac"], AttributionConfig(batch_size=5, damping=0.5))
    assert fixed[0].damping == 0.5


def test_a_methods_own_damping_is_refused_naming_the_python_argument():
    """The refusal named `--option` also when the pair came from the Python API's ``method_options``; it now names
    both (the command line passes its own flag), before any work (no model is needed to be refused)."""
    with pytest.raises(ValueError, match=r"^option ekfac\.damping=0\.5 \(--option, or method_options in Python\): "):
        diagnose(None, None, [], [], ["ekfac"], method_options={"ekfac": {"damping": 0.5}})


def test_tracked_modules_without_gradient_are_named_not_blamed_on_a_damping_of_0(tokenizer):
    """lora_A of a fresh adapter (lora_B zero) has no gradient: the relative damping rule of the exact reference gave
    lambda = 0, and every method, gradsim too, "failed" with an OptionError about a damping of 0.0 nobody gave, while
    the command exited 0. Now one error says the tracked modules have no gradient (the fit's warning names the
    blocks)."""
    import torch

    model = build_model("lora")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    config = AttributionConfig(batch_size=5, include=[r"lora_A"])
    with pytest.raises(ValueError, match=r"every training gradient of the tracked modules is zero"):
        diagnose(model, tokenizer, make_records(6, seed=3), make_records(2, seed=4, prefix="q"), ["gradsim"], config)


def test_shared_damping_of_tiny_gradients_is_their_own_not_zero(tokenizer):
    """With lora_A gradients of about 1e-29 the exact reference's saved float32 GGN blocks are 0, and the shared
    damping read from them was 0; it is taken from the float64 mean eigenvalues the fit recorded, and scales with
    the gradients squared (1e-20 x for a 1e-10 x scale of the gradients; relative 1e-4)."""
    from tests.conftest import scale_lora_b

    config = AttributionConfig(include=["lora_A"])
    train = make_records(6, seed=21)

    def damping(scale):
        reference = fit_reference(scale_lora_b(build_model("lora"), scale), tokenizer, train, config, "exact")
        return shared_damping(reference.curvature, 0.1)

    ordinary, tiny = damping(1e-15), damping(1e-25)
    assert tiny > 0 and tiny == pytest.approx(ordinary * 1e-20, rel=1e-4)


def test_the_reference_of_an_empirical_fisher_diagnosis_is_the_empirical_fisher(setup, tokenizer):
    """Under `fisher="empirical"` the exact reference formed the GGN all the same, so every empirical-Fisher
    method was compared with another matrix than the one it approximates. It is the dense empirical Fisher now:
    DataInf on one training row, exact there (Sherman-Morrison), matches it to round-off."""
    model, train, queries = setup
    config = AttributionConfig(batch_size=5, fisher="empirical")
    rows, reason = diagnose(model, tokenizer, train[:1], queries, ["datainf"], config, exact_blocks="module")
    assert reason is None and rows[0].ihvp_rel_error < 1e-4, rows[0]
    # the methods that take a curvature are given the empirical Fisher too (exact showed 0.90 against it, cg's
    # error was the GGN's distance from it, not its solver's)
    full = {"exact": {"blocks": "full"}}
    rows, reason = diagnose(model, tokenizer, train, queries, ["exact", "cg"], config, full, exact_blocks="full")
    errors = {row.method: row.ihvp_rel_error for row in rows}
    assert reason is None and errors["exact"] < 1e-4 and errors["cg"] < 1e-3, rows


def test_shared_damping_refuses_a_negative_mean_eigenvalue():
    """``shared_damping`` computed ``damping_factor x mean`` itself: an exact Hessian reference with a negative mean
    eigenvalue gave a negative lambda, refused afterwards as "every training gradient ... is zero"; it goes through
    ``relative_damping`` now, which names the indefinite curvature."""
    from types import SimpleNamespace

    import torch

    state = {"a.matrix": torch.zeros(3), "b.matrix": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"'whole GGN' has mean eigenvalue -1\.25"):
        shared_damping(SimpleNamespace(state=state, info={"mean_eigenvalue": {"a": -2.0, "b": 1.0}}), 0.1)
    reference = SimpleNamespace(state=state, info={"mean_eigenvalue": {"a": 2.0, "b": 6.0}})
    assert shared_damping(reference, 0.1) == pytest.approx(0.3)


def diagnose_args(folder, n_train: int, n_queries: int, *more: str) -> list:
    """A `diagnose` command's arguments on a tiny GPT-2 saved in ``folder`` with ``n_train`` training rows and
    ``n_queries`` queries written there, its MLPs' ``c_fc`` tracked, then ``more``."""
    from wherefrom.models.tiny import save_tiny
    from wherefrom.studies.generated import write_jsonl

    save_tiny(folder / "model", arch="gpt2")
    write_jsonl(make_records(n_train, seed=21), folder / "train.jsonl")
    write_jsonl(make_records(n_queries, seed=22, prefix="q"), folder / "queries.jsonl")
    return [
        "diagnose", "--train", folder / "train.jsonl", "--queries", folder / "queries.jsonl", "--model",
        folder / "model", "--include", "mlp.c_fc", *more,
    ]  # fmt: skip


def test_a_method_that_did_not_converge_is_said_in_the_report_and_on_its_own_line(tmp_path):
    """userV: ``diagnose``'s ``ConvergenceWarning`` (cg stopped at its ``max_iter``) began on the progress bar's line,
    so a terminal showed only its source line, and ``diagnose.md``/``.json`` did not say that cg's row is of an
    unconverged iHVP. The report names it under the row; the command prints each warning once, as one line
    (reviewW: the first fix printed it once per query batch, and hid it from ``pytest.warns``)."""
    import subprocess
    import sys

    from tests.cli.conftest import invoke
    from wherefrom.curvature.iterative import ConvergenceWarning

    args = diagnose_args(tmp_path, 6, 4, "--option", "cg.max_iter=1", "--batch-size", "1")
    with pytest.warns(ConvergenceWarning, match="cg did not converge"):
        result = invoke(*args, "--methods", "cg,gradsim", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "diagnose.json").read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert rows["cg"]["warnings"][0].startswith("ConvergenceWarning: cg did not converge in max_iter=1")
    assert rows["gradsim"]["warnings"] == []
    assert (
        "Warnings of cg:\n\n- ConvergenceWarning: cg did not converge" in (tmp_path / "out" / "diagnose.md").read_text()
    )
    command = [sys.executable, "-m", "wherefrom.cli", *map(str, args), "--methods", "cg", "--out", str(tmp_path / "o")]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr
    lines = ran.stderr.replace("\r", "\n").splitlines()
    said = [line for line in lines if line.startswith("warning: ConvergenceWarning: cg did not converge")]
    assert said and len(said) == len(set(said)), lines  # each text once
    assert not any("iterative.py" in line for line in lines), lines  # Python's form: the file, then the source


def test_the_command_takes_fisher_and_refuses_a_methods_own(tmp_path):
    """userF: `diagnose` had no `--fisher`, and `--option fisher=empirical` fitted the methods on the empirical
    Fisher while the exact reference stayed the GGN (`exact` error 0 beside an IgnoredFisherWarning, EK-FAC's
    0.999 measured against another matrix). `--fisher empirical` makes the reference the exact empirical Fisher
    (DataInf on one row is exact there, module by module: error 0); a method's own `fisher` is refused naming `--fisher`."""
    from tests.cli.conftest import invoke

    args = diagnose_args(tmp_path, 1, 2, "--methods", "exact,datainf", "--exact-blocks", "module")
    refused = invoke(*args, "--option", "fisher=empirical", "--out", tmp_path / "refused")
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "--option fisher=empirical: diagnose compares every method" in said, said
    assert "give it as --fisher" in said and not (tmp_path / "refused").exists()
    result = invoke(*args, "--fisher", "empirical", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    rows = {row["method"]: row for row in json.loads((tmp_path / "out" / "diagnose.json").read_text())["rows"]}
    assert rows["exact"]["ihvp_rel_error"] == 0 and rows["datainf"]["ihvp_rel_error"] < 1e-4, rows
