"""Analysis (a): iHVP approximation error against the task metric, across methods (Li et al. 2024).

For each influence method of a bench (any :class:`wherefrom.methods.registry.InfluenceMethod`: ``ekfac``,
``kfac``, ``diagonal``, ``datainf``, ``lissa``, ``arnoldi``, ``cg``, ``gradsim``/``identity``,
``exact``), on each seed's fine-tuned model and the task's test queries (the first ``n_queries``):

    error = ||P_method q - P_ref q|| / ||P_ref q||        (Frobenius over queries and tracked parameters)

with ``q = grad L(z_q)`` the query gradients and ``P = (G + lambda I)^-1`` as each strategy applies
it (:func:`wherefrom.studies.diagnose.ihvp_relative_error`), and its **scale-free** form, where each query's
row is first multiplied by its best non-negative scale (a query's ranking of training rows does not
depend on that scale; identity against a heavily damped inverse differs mostly by ``1 / lambda``).
The reference ``P_ref`` is the exact damped GGN
over all tracked parameters (``exact``, ``blocks="full"``) when it fits, else ``cg`` at a tight
tolerance (its iterations and relative residual are reported). Every method and the reference use
**one absolute damping** ``lambda`` per seed, so the error measures the approximation, not a damping
choice: ``--damping`` or, by default, ``damping_factor x trace(G) / P`` with ``trace(G)`` from a
Hutchinson estimate (``probes`` Rademacher vectors), the rule of the iterative strategies.

Each error is paired with the method's bench metric for the same seed (Acc and Cover for class
tasks, AUPRC for identification, from ``bench.json``); the report gives per-method means with 95%
intervals over seeds and the Spearman correlation between each error and each metric across methods (of the
per-method means) and across all (seed, method) pairs. A lower error should come with a higher
metric if the iHVP approximation is what limits attribution: a negative correlation.

Cache (resumable): ``seed-<s>/ihvp/<digest>/reference.{json,safetensors}`` (the damping and the
reference's preconditioned queries) and ``seed-<s>/ihvp/<digest>/<method>.json``, each keyed by every
setting it depends on; ``<digest>`` names the reference settings, so several coexist.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from safetensors.torch import load_file

from wherefrom.core.commandline import command_line
from wherefrom.core.memory import memory_limit
from wherefrom.core.option_pairs import check_methods_named
from wherefrom.core.store import atomic_save_tensors
from wherefrom.curvature.base import DAMPING_FACTOR, TRACE_PROBES, DataShape, check_damping
from wherefrom.curvature.exact import Blocks, ExactGGN
from wherefrom.engine.api import AttributionConfig, Attributor
from wherefrom.methods.registry import InfluenceMethod, in_family, make_method, options_off_default
from wherefrom.studies.analyses.common import Bench, first_queries, method_options, open_bench, write_report
from wherefrom.studies.diagnose import check_shared_settings, fit_reference, ihvp_relative_error
from wherefrom.studies.metrics import mean_stat, spearman
from wherefrom.studies.toolkit import (
    cached,
    failure_cell,
    failure_notes,
    free_memory,
    interval_cell,
    key_digest,
    markdown_table,
    measured,
    number,
    refuse_replacing,
    store,
)

__all__ = ["IhvpSettings", "influence_methods", "run_ihvp"]

NAME = "ihvp"
_FORMAT_VERSION = 1
_ROW_FORMAT = 2  # rows carry ihvp_rel_error_scaled
ERRORS = ("ihvp_rel_error", "ihvp_rel_error_scaled")


def influence_methods(names: list[str]) -> list[str]:
    """The names among ``names`` that :data:`wherefrom.methods.registry.METHODS` lists in the ``influence``
    family (a curvature strategy: they precondition query gradients)."""
    return [n for n in names if in_family(n, "influence")]


Reference = Literal["auto", "exact", "cg"]
REFERENCES: tuple[str, ...] = typing.get_args(Reference)
"""The iHVP references :class:`IhvpSettings` takes (``--reference``)."""


@dataclass
class IhvpSettings:
    """Settings of :func:`run_ihvp`.

    ``methods``: default the bench's influence methods. ``damping``: one absolute lambda for every
    method and the reference (``None``: ``damping_factor x`` Hutchinson mean eigenvalue of the GGN,
    estimated once per seed). ``reference``: ``"exact"``, ``"cg"`` or ``"auto"`` (exact when the
    memory ``exact`` predicts (:meth:`wherefrom.curvature.ExactGGN.memory_needs`) fits the memory
    limit of :mod:`wherefrom.core.memory`, else cg). ``n_queries``: the first test rows only (``None``: all). ``method_options``:
    ``{method: {key: value}}`` over the bench's own options (``"*"``: every method).
    """

    methods: list[str] | None = None
    damping: float | None = None
    damping_factor: float = DAMPING_FACTOR
    reference: Reference = "auto"
    exact_blocks: Blocks = "full"
    cg_tol: float = 1e-8
    cg_max_iter: int = 1000
    probes: int = TRACE_PROBES
    n_queries: int | None = None
    method_options: dict[str, dict] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` on an impossible setting (the damping by
        :func:`wherefrom.curvature.base.check_damping`, as every strategy's), a method that preconditions nothing, or a method's own
        damping or Fisher among ``method_options`` (:func:`wherefrom.studies.diagnose.check_shared_settings`)."""
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {list(REFERENCES)}, got {self.reference!r}")
        check_damping(self.damping, self.damping_factor)
        if self.n_queries is not None and self.n_queries < 1:
            raise ValueError(f"n_queries must be >= 1, got {self.n_queries}")
        if not self.cg_tol > 0:  # refused by cg as its option 'tol', after the bench was opened (reviewW)
            raise ValueError(f"cg_tol must be > 0, got {self.cg_tol}")
        check_shared_settings(self.method_options, "ihvp")
        if self.methods is not None:
            other = [m for m in self.methods if m not in influence_methods(self.methods)]
            if other:
                raise ValueError(
                    f"methods (--methods) {other}: not influence methods (no preconditioned queries to compare)"
                )


def _scalars(info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-sized part of a curvature's ``info`` (numbers, strings and flat dicts of them)."""

    def simple(v: Any) -> bool:
        return isinstance(v, (int, float, str, bool)) or v is None

    return {k: v for k, v in info.items() if simple(v) or (isinstance(v, dict) and all(simple(x) for x in v.values()))}


def _exact_fits(attributor: Attributor, train_lengths: list[int], blocks: str) -> bool:
    """Whether the bytes ``exact`` predicts for its fit (:meth:`ExactGGN.memory_needs`: the dense GGN,
    its blocks and inverses, one example's Jacobian) are within the memory limit."""
    longest = max(train_lengths, default=1)
    data = DataShape(
        len(train_lengths),
        attributor.config.batch_size,
        longest,
        longest,
        attributor.model.get_output_embeddings().weight.shape[0],
    )
    limit, _ = memory_limit(attributor.device)
    return limit is None or sum(ExactGGN(blocks=blocks).memory_needs(attributor.modules, data).values()) <= limit


def _reference(
    bench: Bench, settings: IhvpSettings, seed: int, model, tokenizer, task, queries, say: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The damping lambda and ``P_ref q`` for the seed: ``(info, {module: (n_query, out, in')})``."""
    c = bench.config
    base = AttributionConfig(batch_size=c.batch_size, max_length=c.max_length, seed=seed)
    cg_options = {"tol": settings.cg_tol, "max_iter": settings.cg_max_iter, "probes": settings.probes}
    info: dict[str, Any] = {}
    with measured(next(model.parameters()).device) as usage:
        estimate = None
        damping = settings.damping
        if damping is None:  # cg with the default rule estimates trace(G) / P once: that lambda for all
            estimate = fit_reference(
                model, tokenizer, task.train, replace(base, damping_factor=settings.damping_factor), "cg", **cg_options
            )
            damping = estimate.curvature.lam
            info.update(
                {k: estimate.curvature.info.get(k) for k in ("trace_estimate", "trace_standard_error", "parameters")}
            )
        config = replace(base, damping=damping)
        strategy = settings.reference
        if strategy == "auto":
            probe = Attributor(model, tokenizer, config)
            strategy = (
                "exact"
                if _exact_fits(probe, [len(e) for e in probe.encode(task.train)], settings.exact_blocks)
                else "cg"
            )
        reference = None
        if strategy == "exact":
            try:
                reference = fit_reference(model, tokenizer, task.train, config, "exact", blocks=settings.exact_blocks)
            except (MemoryError, torch.OutOfMemoryError) as error:
                if settings.reference == "exact":
                    raise
                info["exact_refused"] = str(error)
                strategy = "cg"
        if reference is None:
            reference = (
                estimate
                if estimate is not None
                else fit_reference(model, tokenizer, task.train, config, "cg", **cg_options)
            )
        _, blocks = reference.preconditioned_queries(queries)
    info.update(
        strategy=strategy,
        damping=damping,
        seconds=usage["seconds"],
        peak_mib=usage["peak_mib"],
        blocks=settings.exact_blocks if strategy == "exact" else "full",
    )
    if strategy == "cg":
        info["cg"] = dict(reference.curvature.info.get("last_solve", {}))
    say(f"seed {seed}: reference {strategy}, damping {damping:.4g}, {usage['seconds']:.1f} s")
    return info, {name: blocks[name].detach().to("cpu", torch.float64).contiguous() for name in reference.module_names}


def _method_key(
    bench: Bench, settings: IhvpSettings, ref_key: dict[str, Any], ref: dict[str, Any], method: str
) -> dict[str, Any]:
    """Everything a (seed, method) error depends on: the reference's key, its damping, the method's options."""
    return {
        "reference": ref_key,
        "row_format": _ROW_FORMAT,
        "damping": ref["info"]["damping"],
        "method": method,
        "options": options_off_default(method, method_options(bench, settings.method_options, method)),
    }


def _method_row(
    bench: Bench,
    settings: IhvpSettings,
    seed: int,
    method: str,
    model,
    tokenizer,
    task,
    queries,
    damping: float,
    reference: dict[str, torch.Tensor],
) -> dict[str, Any]:
    c = bench.config
    config = AttributionConfig(batch_size=c.batch_size, max_length=c.max_length, seed=seed, damping=damping)
    options = method_options(bench, settings.method_options, method)
    row: dict[str, Any] = {
        "seed": seed,
        "method": method,
        "ihvp_rel_error": None,
        "ihvp_rel_error_scaled": None,
        "seconds": None,
        "peak_mib": None,
        "error": None,
        "info": None,
    }
    try:
        chosen = make_method(method, model, tokenizer, config, **options)
        if not isinstance(chosen, InfluenceMethod) or chosen.attributor.config.normalize is not None:
            raise ValueError(
                f"{method!r} does not precondition query gradients (normalised or not an influence method)"
            )
        with measured(next(model.parameters()).device) as usage:
            chosen.fit(task.train)
            _, approx = chosen.attributor.preconditioned_queries(queries)
        row["ihvp_rel_error"] = ihvp_relative_error(approx, reference, chosen.attributor.module_names)
        row["ihvp_rel_error_scaled"] = ihvp_relative_error(
            approx, reference, chosen.attributor.module_names, scale_free=True
        )
        row["seconds"], row["peak_mib"] = usage["seconds"], usage["peak_mib"]
        row["info"] = _scalars(chosen.attributor.curvature.info)
    except Exception as error:
        row["error"] = f"{type(error).__name__}: {error}"
    finally:
        chosen = approx = None
        free_memory()
    return row


def _unit_keys(
    bench: Bench,
    settings: IhvpSettings,
    seed: int,
    folder: str,
    ref_key: dict[str, Any],
    ref: dict[str, Any],
    methods: list[str],
    overwrite: bool,
) -> dict[str, Any]:
    """Each method unit's key under the reference ``ref``, after refusing (unless ``overwrite``) to replace a finished
    unit of another key (:func:`wherefrom.studies.toolkit.refuse_replacing`)."""
    keys = {method: _method_key(bench, settings, ref_key, ref, method) for method in methods}
    if not overwrite:
        refuse_replacing((bench.unit_path(seed, folder, method), key) for method, key in keys.items())
    return keys


def run_ihvp(
    bench: Bench | str,
    settings: IhvpSettings | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run analysis (a) on a bench folder (resuming from its cache); returns what ``ihvp.json`` holds
    and writes ``ihvp.json`` / ``ihvp.md`` into the folder (each reference setting in its own cache folder).
    ``overwrite=False`` (the default, as ``wherefrom analyze`` without ``--overwrite``): a seed's unit made with other settings is
    refused before that seed's work (:func:`wherefrom.studies.toolkit.refuse_replacing`), not replaced."""
    bench = open_bench(bench)
    settings = settings or IhvpSettings()
    settings.validate()
    say = log or (lambda _line: None)
    methods = settings.methods or influence_methods(bench.config.methods)
    if not methods:
        raise ValueError(
            f"the bench ran no influence method ({', '.join(bench.config.methods)}); name influence methods to run "
            "with --methods (Python: IhvpSettings(methods=[...]))"
        )
    check_methods_named(settings.method_options, methods)
    for method in methods:  # the bench's own options may give one: refused before any work or cached row
        check_shared_settings({method: method_options(bench, {}, method)}, "ihvp", "the bench's --option")
    rows: list[dict[str, Any]] = []
    references: dict[str, Any] = {}
    for seed in bench.config.seeds:
        task = bench.task(seed)
        n_queries = first_queries(task.test, settings.n_queries, say)
        queries = task.test[:n_queries] if n_queries else task.test
        ref_key = {
            **bench.seed_key(seed, task),
            "analysis": NAME,
            "format": _FORMAT_VERSION,
            **{k: v for k, v in asdict(settings).items() if k not in ("methods", "method_options")},
            "n_queries": n_queries,
        }
        folder = f"{NAME}/{key_digest(ref_key, 10)}"  # one cache folder per reference setting: switching back reuses it
        ref_json, ref_tensors = (
            bench.unit_path(seed, folder, "reference"),
            bench.unit_path(seed, folder, "reference", ".safetensors"),
        )
        ref = cached(ref_json, ref_key, needs=[ref_tensors])
        done = {}
        if ref is not None:
            keys = _unit_keys(bench, settings, seed, folder, ref_key, ref, methods, overwrite)
            for method in methods:
                done[method] = cached(bench.unit_path(seed, folder, method), keys[method])
        todo = [m for m in methods if done.get(m) is None]
        if todo:
            loaded, tuned = bench.finetuned(seed, task, say)
            if ref is None:
                info, blocks = _reference(bench, settings, seed, tuned.model, loaded.tokenizer, task, queries, say)
                atomic_save_tensors(blocks, ref_tensors)
                ref = store(ref_json, ref_key, {"info": info})
                # a reference computed again: its units are checked before they are written
                _unit_keys(bench, settings, seed, folder, ref_key, ref, methods, overwrite)
            else:
                blocks = dict(load_file(str(ref_tensors)).items())
            for method in todo:
                row = _method_row(
                    bench,
                    settings,
                    seed,
                    method,
                    tuned.model,
                    loaded.tokenizer,
                    task,
                    queries,
                    ref["info"]["damping"],
                    blocks,
                )
                key = _method_key(bench, settings, ref_key, ref, method)
                done[method] = store(bench.unit_path(seed, folder, method), key, row)
                say(
                    f"seed {seed} {method}: "
                    + (f"failed: {row['error']}" if row["error"] else f"error {row['ihvp_rel_error']:.3g}")
                )
            loaded = tuned = blocks = None
            free_memory()
        else:
            say(f"seed {seed}: reused every row")
        references[str(seed)] = ref["info"]
        rows += [done[m] for m in methods]
    summary = _summary(bench, rows, methods)
    command = command or command_line("analyze ihvp", [("--bench", bench.folder)])
    payload = {
        "command": command,
        "settings": asdict(settings),
        "methods": methods,
        "references": references,
        "rows": rows,
        **summary,
    }
    write_report(bench, NAME, payload, _markdown(bench, payload))
    return payload


def _summary(bench: Bench, rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """Per method: both errors and the bench metrics over seeds; Spearman(error, metric) across methods
    (of the per-method means) and across (seed, method) pairs, for each error and metric."""
    per_method: dict[str, Any] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        per_method[method] = {
            **{e: mean_stat([r.get(e) for r in mine], within=(0.0, math.inf)) for e in ERRORS},  # norms: >= 0
            "seconds": mean_stat([r["seconds"] for r in mine]),
            "metrics": {
                n: mean_stat([bench.metric(r["seed"], method, n) for r in mine], within=(0.0, 1.0))
                for n in bench.metric_names
            },
            "errors": {str(r["seed"]): r["error"] for r in mine if r["error"]},
        }
    correlation: dict[str, Any] = {}
    for error in ERRORS:
        for name in bench.metric_names:
            means = [(per_method[m][error] or {}).get("mean") for m in methods]
            metrics = [(per_method[m]["metrics"][name] or {}).get("mean") for m in methods]
            pairs = [(r.get(error), bench.metric(r["seed"], r["method"], name)) for r in rows]
            correlation[f"{error}:{name}"] = {
                "error": error,
                "metric": name,
                "across_methods": spearman(means, metrics),
                "n_methods": sum(e is not None and v is not None for e, v in zip(means, metrics)),
                "across_pairs": spearman([e for e, _ in pairs], [v for _, v in pairs]),
                "n_pairs": sum(e is not None and v is not None for e, v in pairs),
            }
    return {"per_method": per_method, "spearman": correlation}


def _markdown(bench: Bench, payload: dict[str, Any]) -> str:
    names = list(bench.metric_names)
    lines = [
        f"# wherefrom analyze ihvp: {bench.config.task}",
        "",
        f"Command: `{payload['command']}`",
        "",
        (
            "iHVP relative error `||P q - P_ref q|| / ||P_ref q||` of each method's preconditioned test-query "
            "gradients at one absolute damping per seed, against its bench metric; mean [95% t interval] over seeds."
        ),
        "",
        (
            "Scale-free: each query's row first multiplied by its best non-negative scale (a query's ranking "
            "does not depend on it), so only the direction's error remains."
        ),
        "",
    ]
    table = []
    for method, entry in payload["per_method"].items():
        if entry["ihvp_rel_error"] is None:
            table.append([method, failure_cell(next(iter(entry["errors"].values()), None))])
            continue
        seconds = entry["seconds"]["mean"] if entry["seconds"] else None
        table.append(
            [
                method,
                interval_cell(entry["ihvp_rel_error"], ".3g"),
                interval_cell(entry["ihvp_rel_error_scaled"], ".3g"),
                *(interval_cell(entry["metrics"][n]) for n in names),
                number(seconds, ".1f"),
                str(entry["ihvp_rel_error"]["n"]),
            ]
        )
    lines.append(markdown_table(["method", "iHVP rel. error", "scale-free", *names, "time, s", "seeds"], table))
    failed = [(f"{m}, seed {s}", e) for m, entry in payload["per_method"].items() for s, e in entry["errors"].items()]
    if failed:  # the table's cell is the first error, cut
        lines.append(failure_notes(failed).rstrip("\n"))
    options = {m: method_options(bench, payload["settings"]["method_options"], m) for m in payload["per_method"]}
    if any(options.values()):
        lines += [
            "",
            "Method options: "
            + "; ".join(f"{m} " + ", ".join(f"{k}={v}" for k, v in o.items()) for m, o in options.items() if o)
            + ".",
        ]
    full_reference = payload["settings"].get("exact_blocks", "full") == "full"  # userJ: said under module too
    if "exact" in options and options["exact"].get("blocks", "module") != "full" and full_reference:
        lines += [
            "",
            (
                '`exact` is the bench\'s method: one exact inverse per module (`blocks="module"`, no cross-module '
                "terms); its error against the full-GGN reference is what those terms carry."
            ),
        ]
    lines += [
        "",
        "Spearman correlation between iHVP error and metric (negative: smaller error, better attribution):",
        "",
    ]
    for corr in payload["spearman"].values():
        label = "scale-free error" if corr["error"].endswith("scaled") else "error"
        lines.append(
            f"- {label} vs {corr['metric']}: across methods {number(corr['across_methods'])} (n = {corr['n_methods']}), "
            f"across (seed, method) pairs {number(corr['across_pairs'])} (n = {corr['n_pairs']})"
        )
    if any(corr[side] is None for corr in payload["spearman"].values() for side in ("across_methods", "across_pairs")):
        lines += ["", "– : undefined: fewer than 3 finite pairs, or one side constant (every method's metric 1.0)."]
    lines += ["", "References:", ""]
    for seed, info in payload["references"].items():
        text = f"- seed {seed}: `{info['strategy']}` ({info.get('blocks')} GGN), damping {info['damping']:.4g}"
        if info.get("trace_estimate") is not None:
            text += (
                f" ({payload['settings']['damping_factor']:g} x Hutchinson trace(G) / P = "
                f"{info['trace_estimate']:.4g} / {info['parameters']})"
            )
        if info["strategy"] == "cg":
            cg = info.get("cg", {})
            text += (
                f"; cg {cg.get('iterations')} iterations, relative residual {number(cg.get('relative_residual'), '.2e')}"
                f" (tol {cg.get('tol')}, {'converged' if cg.get('converged') else 'NOT converged'})"
            )
        lines.append(text + f"; {info['seconds']:.1f} s")
    return "\n".join(lines) + "\n"
