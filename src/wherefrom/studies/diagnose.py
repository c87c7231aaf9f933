"""The iHVP-approximation study of Li et al. (2024), made a tool: each method against exact influence.

For every method on one model and data set, :func:`diagnose` reports

* ``ihvp_rel_error``: ``||P_method q - P_exact q|| / ||P_exact q||`` over all queries and tracked
  parameters (influence methods only), where ``P_exact = (G + lambda I)^-1`` with the dense GGN over
  all tracked parameters (``exact_blocks="full"``, cross-module terms included) or its module blocks; under
  ``fisher="empirical"`` ``G`` is the dense empirical Fisher, the matrix such methods approximate
  (:func:`exact_options`);
* ``spearman``: rank correlation of the method's ``(n_query, n_train)`` scores with exact scores,
  over all pairs, and ``spearman_per_query``, the mean over queries
  (:func:`wherefrom.studies.metrics.spearman_rows`);
* ``seconds`` (fit + scores) and ``peak_mib``, the peak memory above the level at the start
  (:func:`wherefrom.studies.toolkit.measured`: CUDA ``max_memory_allocated``; Linux CPU the process's
  resident-set high-water mark; elsewhere ``None``).

Every method and the exact reference use one absolute damping, so that the error column compares
like with like (each method's own default, e.g. EK-FAC's per-module 0.1 x mean eigenvalue of its
factors, would make it differ from the reference by the damping alone): ``config.damping`` when set,
else :func:`shared_damping` of the exact GGN, ``damping_factor x trace(G) / P`` over all tracked
parameters (Grosse et al.'s rule applied once, to the whole GGN). Each row records it (``damping``);
when the exact reference cannot be formed, each method keeps its own default (``damping`` ``None``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from wherefrom.core.data import Record
from wherefrom.core.option_pairs import options_for
from wherefrom.curvature.base import SMALLEST_DAMPING, Curvature, DataShape, Progress, no_progress, relative_damping
from wherefrom.curvature.exact import BLOCKS
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.registry import METHODS, InfluenceMethod, make_method, method_spec
from wherefrom.studies import toolkit
from wherefrom.studies.metrics import spearman_rows
from wherefrom.studies.toolkit import (
    failure_cell,
    failure_notes,
    markdown_table,
    measured,
    number,
    provenance,
    recorded_warnings,
)

EXACT_BLOCKS = "full"
"""The default blocks of :func:`diagnose`'s exact reference (``--exact-blocks``): the whole GGN, cross-module terms
included (:data:`wherefrom.curvature.exact.BLOCKS`)."""


@dataclass
class Diagnosis:
    """One method's row of the study (``None`` where a quantity does not apply or was not measured)."""

    method: str
    seconds: float
    peak_mib: float | None
    ihvp_rel_error: float | None = None
    spearman: float | None = None
    spearman_per_query: float | None = None
    error: str | None = None
    damping: float | None = None
    warnings: list[str] = field(default_factory=list)
    """The method's warnings of wherefrom (``Category: message``), e.g. an iterative inverse that did not converge: its row's
    numbers are of an unconverged iHVP (they were printed on stderr alone, and lost with the terminal)."""


def _flat(blocks: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([blocks[n].reshape(blocks[n].shape[0], -1).double().cpu() for n in names], dim=1)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(Spearman over all pairs, mean over queries of the per-query Spearman)`` of two ``(n_query, n_train)`` score matrices."""
    a, b = a.cpu().double().numpy(), b.cpu().double().numpy()
    overall = float(spearman_rows(a.reshape(1, -1), b.reshape(1, -1))[0])
    return overall, float(spearman_rows(a, b).mean())


def fit_reference(
    model, tokenizer, train: Sequence[Record], config: AttributionConfig, strategy: str = "exact", **options: Any
) -> Attributor:
    """An :class:`Attributor` fitted on ``train`` with a reference strategy, ``exact`` (options:
    ``blocks``) or ``cg`` (options: ``tol``, ``max_iter``, ``probes``), at ``config``'s damping.

    ``exact`` raises ``MemoryError`` (with the byte count) when the dense GGN does not fit. A fitted
    ``cg`` with ``config.damping=None`` holds the damping it estimated (``0.1 x trace(G) / P`` by
    Hutchinson) in ``curvature.lam``: the one absolute value to give every method for a comparison.
    """
    reference = Attributor(model, tokenizer, replace(config, strategy=strategy, strategy_options=dict(options)))
    reference.fit(train)
    return reference


def fisher_options(name: str, config: AttributionConfig, given: dict[str, Any]) -> dict[str, Any]:
    """Method ``name``'s options ``given``, with ``curvature="fisher"`` added under ``config.fisher ==
    "empirical"`` for a method that takes a ``curvature`` and was given none (``exact``, ``cg``, ``lissa``,
    ``arnoldi``): their GGN and Hessian are formed from the model, so the setting did not reach them, and they
    were compared with another matrix than the others (review: ``exact`` showed an error of 0.90)."""
    takes = any(option.name == "curvature" for option in method_spec(name).options)
    if config.fisher == "empirical" and takes and "curvature" not in given:
        return {**given, "curvature": "fisher"}
    return dict(given)


def exact_options(config: AttributionConfig, exact_blocks: str) -> dict[str, Any]:
    """The options of :func:`diagnose`'s ``exact`` reference: ``exact_blocks``, on the dense empirical Fisher under
    ``config.fisher == "empirical"`` (:func:`fisher_options`), the matrix the methods fitted on it approximate
    (the GGN, the true Fisher's expectation, was taken whatever the setting)."""
    return fisher_options("exact", config, {"blocks": exact_blocks})


def reference_bytes(
    model, tokenizer, train: Sequence[Record], config: AttributionConfig, exact_blocks: str = EXACT_BLOCKS
) -> int:
    """Bytes the exact reference of :func:`diagnose` will allocate on ``train`` (what its fit checks
    against the memory limit: the dense GGN, its inverse, one example's ``(t, V, P)`` Jacobian), predicted
    without a model pass, so that a caller can say it, or stop, before any work."""
    attributor = Attributor(
        model, tokenizer, replace(config, strategy="exact", strategy_options=exact_options(config, exact_blocks))
    )
    encoded = attributor.encoded(train)
    shape = DataShape.measure(model, lambda: attributor.batches(encoded).without_ids())
    return int(sum(attributor.new_curvature().memory_needs(attributor.modules, shape).values()))


def shared_damping(reference: Curvature, damping_factor: float) -> float:
    """``damping_factor x trace(G) / P``: the relative damping rule applied to the whole GGN ``G`` of a
    fitted ``exact`` ``reference`` (its blocks' traces summed over all ``P`` tracked parameters), from the float64
    mean eigenvalue it recorded per block (its saved float32 ``.matrix`` is 0 for gradients of about 1e-20), by
    :func:`wherefrom.curvature.base.relative_damping` (which refuses a negative or non-finite mean: a Hessian)."""
    sizes = {
        key.removesuffix(".matrix"): len(value) for key, value in reference.state.items() if key.endswith(".matrix")
    }
    means = reference.info["mean_eigenvalue"]
    mean = sum(means[key] * size for key, size in sizes.items()) / sum(sizes.values())
    return relative_damping(None, damping_factor, mean, "whole GGN")


def ihvp_relative_error(
    approx: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], names: Sequence[str], scale_free: bool = False
) -> float:
    """``||P_method q - P_ref q|| / ||P_ref q||`` (Frobenius, over all queries and the modules ``names``)
    of preconditioned query blocks ``{module: (n_query, out, in')}``.

    ``scale_free=True`` first multiplies each query's row of ``P_method q`` by its best non-negative
    scale ``c_i = max(0, <a_i, r_i> / ||a_i||^2)``: a query's ranking of training rows does not depend
    on that scale (e.g. identity vs a heavily damped inverse differ mostly by ``1 / lambda``), so what
    remains is the error of the direction, ``sqrt(sum_i ||r_i||^2 sin^2 theta_i) / ||R||`` for rows
    at an acute angle ``theta_i`` (1 for a row at a right or obtuse angle).
    """
    reference_flat, approx_flat = _flat(reference, names), _flat(approx, names)
    if scale_free:
        norms = (approx_flat * approx_flat).sum(1)
        scale = ((approx_flat * reference_flat).sum(1) / norms.where(norms > 0, torch.ones_like(norms))).clamp_min(0)
        approx_flat = scale[:, None] * approx_flat
    return float((approx_flat - reference_flat).norm() / reference_flat.norm())


SHARED_SETTINGS = ("damping", "damping_factor", "fisher")
"""The attribution settings every method of :func:`diagnose` (and the ihvp analysis) shares with the exact reference:
its damping and the matrix it is formed from (the GGN, or the empirical Fisher under ``fisher="empirical"``)."""


def check_shared_settings(
    method_options: dict[str, dict[str, Any]],
    study: str = "diagnose",
    source: str | None = None,
) -> None:
    """``ValueError`` naming the pair (given by ``source``; ``None``: the command line's ``--option`` or the Python
    API's ``method_options``, both named) when ``method_options`` (``{method or "*": {key: value}}``) sets one of a
    method's :data:`SHARED_SETTINGS`: ``study`` (diagnose, the ihvp analysis) compares every method with the exact
    reference at one absolute damping and on one matrix (the config's), and a method of its own damping was compared
    at another while its row showed the shared one; one of its own ``fisher`` (userF: ``--option fisher=empirical``)
    was fitted on the empirical Fisher and measured against the GGN."""
    for method, options in method_options.items():
        for key in SHARED_SETTINGS:
            if key in options:
                pair = f"{key}={options[key]}" if method == "*" else f"{method}.{key}={options[key]}"
                given = (
                    f"option {pair} (--option, or method_options in Python)" if source is None else f"{source} {pair}"
                )
                raise ValueError(
                    f"{given}: {study} compares every method with the exact reference at one damping and on one "
                    f"Fisher; give it as --{key.replace('_', '-')} (the config's {key})"
                )


def diagnose(
    model,
    tokenizer,
    train: Sequence[Record],
    queries: Sequence[Record],
    methods: Sequence[str],
    config: AttributionConfig | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    exact_blocks: str = EXACT_BLOCKS,
    progress: Progress = no_progress,
) -> tuple[list[Diagnosis], str | None]:
    """Run every method and compare it with exact influence, at one damping (module docstring); returns
    the rows and, when the exact reference could not be formed, the reason (the comparisons are then
    ``None``). ``method_options``: ``{method or "*": {key: value}}`` (a ``"*"`` entry applies to every method).
    ``progress`` (tqdm-like) wraps the loop over methods; the fits report their own batches. Raises
    ``ValueError`` for a method's own damping or Fisher among ``method_options`` (:func:`check_shared_settings`), and when every
    training gradient of the tracked modules is zero (the shared damping would be 0)."""
    check_shared_settings(method_options or {})
    if exact_blocks not in BLOCKS:
        raise ValueError(f"exact_blocks must be one of {list(BLOCKS)}, got {exact_blocks!r}")
    if not queries:
        raise ValueError("diagnose needs at least one query row")
    config = replace(config or AttributionConfig(), query_rank=None)
    method_options = method_options or {}
    names = Attributor(model, tokenizer, config).module_names
    device = next(model.parameters()).device
    exact_scores = exact_queries = None
    reason = None
    try:
        reference = fit_reference(model, tokenizer, train, config, "exact", **exact_options(config, exact_blocks))
        if config.damping is None:
            config = replace(config, damping=shared_damping(reference.curvature, config.damping_factor))
            if not config.damping >= SMALLEST_DAMPING:  # G = 0: no influence to compare, a damping no method takes
                raise ValueError(
                    "every training gradient of the tracked modules is zero, or nearly (their GGN is 0; e.g. lora_A "
                    "of a fresh LoRA adapter, whose lora_B is zero: the fit's warning names such blocks), so the "
                    f"relative damping rule gives lambda = {config.damping:.3g} and there is no influence to compare; "
                    "track modules that get a gradient (include/exclude)"
                )
            if exact_blocks == "module":  # its blocks were damped each by its own mean eigenvalue: refit
                reference = fit_reference(
                    model, tokenizer, train, config, "exact", **exact_options(config, exact_blocks)
                )
        query_ids, exact_queries = reference.preconditioned_queries(queries)
        train_gradients = reference.token_factor_stream(train, description="train gradients")
        exact_scores = reference.scores_from_gradients(query_ids, exact_queries, train_gradients).total.double()
    except (MemoryError, torch.OutOfMemoryError) as error:
        reason = str(error)
    rows = []
    for name in progress(list(methods), "methods"):
        with recorded_warnings() as said:
            try:
                options = fisher_options(name, config, options_for(method_options, name))
                method = make_method(name, model, tokenizer, config, progress, **options)
                with measured(device) as cost:
                    method.fit(train)
                    scores = method.scores(queries, train)
                row = Diagnosis(name, cost["seconds"], cost["peak_mib"], damping=config.damping)
                if exact_scores is not None:  # its iHVP again: its warnings again, recorded with the others
                    row.spearman, row.spearman_per_query = _spearman(scores.total.double(), exact_scores)
                    if isinstance(method, InfluenceMethod) and method.attributor.config.normalize is None:
                        _, approx = method.attributor.preconditioned_queries(queries)
                        row.ihvp_rel_error = ihvp_relative_error(approx, exact_queries, names)
            except (MemoryError, RuntimeError, ValueError) as error:
                row = Diagnosis(name, float("nan"), None, error=f"{type(error).__name__}: {error}")
        row.warnings = said
        rows.append(row)
    return rows, reason


def damping_cell(method: str, damping: float | None) -> str:
    """The table's damping cell of ``method``'s row: the absolute ``damping``; ``not read`` for a method that takes
    none (``gradsim``, ``repsim``, ``bm25``, ``tracin``: the shared value changed none of its numbers, and showing it
    said otherwise); ``own default`` where there was no exact reference to take the shared one from (``None``)."""
    if method in METHODS and not method_spec(method).takes("damping"):
        return "not read"
    return number(damping, ".3g") if damping is not None else "own default"


def write_report(
    rows: Sequence[Diagnosis], reason: str | None, folder: Path, context: dict[str, Any]
) -> tuple[Path, Path]:
    """``diagnose.json`` (provenance, ``context``, rows) and ``diagnose.md`` (a table) in ``folder``,
    atomically (:func:`wherefrom.studies.toolkit.write_report`); ``context["command"]`` is the command line."""
    header = [
        "method",
        "iHVP rel. error vs exact",
        "Spearman vs exact (all pairs)",
        "mean per-query Spearman",
        "time, s",
        "peak memory, MiB",
        "damping (absolute)",
    ]
    table = [
        [r.method, failure_cell(r.error)]
        if r.error
        else [
            r.method,
            number(r.ihvp_rel_error, ".3g"),
            number(r.spearman),
            number(r.spearman_per_query),
            number(r.seconds, ".2f"),
            number(r.peak_mib, ".0f"),
            damping_cell(r.method, r.damping),
        ]
        for r in rows
    ]
    command = context.get("command", "")
    text = (
        "# wherefrom diagnose\n\n"
        + (f"Command: `{command}`\n\n" if command else "")
        + markdown_table(header, table)
        + (f"\n\nNo exact reference: {reason}" if reason else "")
        + ("\n" + failure_notes((r.method, r.error) for r in rows)).rstrip("\n")
        + "".join(
            f"\n\nWarnings of {r.method}:\n" + "".join(f"\n- {w}" for w in r.warnings) for r in rows if r.warnings
        )
        + "\n"
    )
    payload = {**provenance(command), **context, "exact_reference_missing": reason, "rows": [asdict(r) for r in rows]}
    return toolkit.write_report(Path(folder) / "diagnose", payload, text)
