"""Proximal Bregman response function (PBRF; Bae et al., 2022), the target influence functions estimate.

For a training row ``z_m`` and a weight ``eps``, starting from the trained weights ``theta_s``::

    theta_eps = argmin_theta  (1/N) sum_i D_i(theta) + eps L(z_m, theta) + (lambda / 2) ||theta - theta_s||^2

over the **tracked** parameters only (:func:`wherefrom.core.tracking.select_modules` with the
``AttributionConfig``'s ``include``/``exclude``: e.g. the LoRA A/B matrices of a LoRA model); every
other weight stays fixed. ``D_i`` is the Bregman divergence of the softmax cross-entropy around
``theta_s``'s own outputs, which for softmax cross-entropy is ``sum_t KL(p_s,t || p_theta,t)`` over
the completion tokens ``t`` of row ``i`` (independent of the row's labels); ``L`` is the training loss
(summed over completion tokens, :func:`wherefrom.core.task.per_example_loss`), ``N`` the number of training
rows.

Normalisation (matches :mod:`wherefrom.curvature.exact`): the Hessian of ``(1/N) sum_i D_i`` at
``theta_s`` is ``G = mean_i sum_t J_it^T (diag p - p p^T) J_it``, the GGN of the *mean over rows of the
summed-token loss* that ``exact`` (``blocks="full"``), ``cg``, ``lissa`` and ``arnoldi`` form. So as
``eps -> 0``, ``d theta_eps / d eps = -(G + lambda I)^-1 grad L(z_m)`` and

    d f(z_q; theta_eps) / d eps  ->  -grad f(z_q)^T (G + lambda I)^-1 grad L(z_m) = I(z_m, z_q)

with the *same* ``lambda``: the README's influence, positive = proponent. :func:`pbrf_influence`
returns the central difference ``(f(theta_{+eps}) - f(theta_{-eps})) / (2 eps)`` (one-sided
``(f(theta_{+eps}) - f(theta_s)) / eps`` with ``symmetric=False``), in nats per unit weight, the units
of influence scores. At a finite ``eps`` (default ``1 / N``: one row's weight, Bae et al.'s setting)
it also carries the nonlinear response that influence functions linearise away.

Optimiser: ``lbfgs`` (default; full batch, strong-Wolfe line search, deterministic) or ``adam``
(``batch_size`` rows of the divergence term per step, seeded; ``None`` = full batch). Convergence:
the max-abs gradient of the objective relative to its value at ``theta_s`` (``eps ||grad L(z_m)||_inf``:
the divergence and proximal terms have zero gradient there) must fall below ``tol``; the weights are
then within about ``tol x (lambda_max + lambda) / lambda`` (relative) of the optimum, so a tight
answer needs a float64 model (float32 gradients stall near 1e-4). Non-converged solves warn
(:class:`wherefrom.curvature.ConvergenceWarning`) and are listed in ``info``.

Cost: every row is one (``symmetric=False``) or two optimisations over the whole training set, each
objective evaluation a forward and backward pass over all ``N`` rows (L-BFGS: tens to hundreds per
solve). The ``-eps`` solve starts from ``2 theta_s - theta_{+eps}`` (first-order guess). Reference
distributions ``p_s`` are computed once, on completion positions only (``N x tokens x V`` numbers).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from wherefrom.core.data import Record, check_records
from wherefrom.core.encoding import EncodedExample, collate, encode_records, pad_id
from wherefrom.core.options import OptionSpec, check_options, from_signature
from wherefrom.core.task import IGNORE_INDEX, completion_predictions, model_inputs, per_example_loss
from wherefrom.core.tracking import TrackedModule, select_modules
from wherefrom.curvature.base import (
    DAMPING_FACTOR,
    TRACE_PROBES,
    Progress,
    check_damping,
    no_progress,
    relative_damping,
)
from wherefrom.curvature.iterative import ConvergenceWarning
from wherefrom.curvature.products import GGNOperator
from wherefrom.engine.api import AttributionConfig
from wherefrom.models.loading import eval_mode
from wherefrom.studies.toolkit import cached, refuse_replacing, store

__all__ = ["OPTIMIZERS", "PBRF_OPTIONS", "PBRFConfig", "pbrf_config", "pbrf_influence"]

Optimizer = Literal["lbfgs", "adam"]
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
"""The optimizers a PBRF solve runs with (:attr:`PBRFConfig.optimizer`)."""

_FORMAT_VERSION = 1


@dataclass
class PBRFConfig:
    """Settings of the PBRF solves (see the module docstring).

    ``eps``: weight of the row's loss (``None``: ``1 / N``); ``damping``: absolute ``lambda`` of the
    proximal term (``None``: ``damping_factor x trace(G) / P``, the trace by Hutchinson with ``probes``
    seeded probes, as ``cg``/``lissa``/``arnoldi`` do); ``optimizer``: ``"lbfgs"`` or ``"adam"``;
    ``steps``: iterations per solve at most; ``lr``: step size (``None``: 1.0 for L-BFGS, whose line
    search scales it, 1e-3 for Adam); ``history``: L-BFGS memory; ``batch_size``: Adam's mini-batch of
    divergence rows (``None`` = all); ``tol``: relative max-abs gradient at which a solve counts as
    converged; ``symmetric``: central (``True``) or one-sided difference; ``seed``: probes and Adam
    draws; ``float64``: solve on a float64 copy of the model (the given model is then never touched):
    float32 gradients put a noise floor near ``1e-7 / eps`` on the relative objective gradient, which
    stops L-BFGS's line search early (measured on a float32 tiny GPT-2 at ``eps = 1e-3``: stalls at
    7e-4 to 1e-2; on its float64 copy: converges below 1e-4 in 86-155 iterations).
    """

    eps: float | None = None
    damping: float | None = None
    damping_factor: float = DAMPING_FACTOR
    optimizer: Optimizer = "lbfgs"
    steps: int = 500
    lr: float | None = None
    history: int = 50
    batch_size: int | None = None
    tol: float = 1e-6
    symmetric: bool = True
    probes: int = TRACE_PROBES
    seed: int = 0
    float64: bool = False

    def __post_init__(self) -> None:
        if self.eps is not None and not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a positive finite number or None, got {self.eps}")
        check_damping(self.damping, self.damping_factor)  # > 0: the proximal term keeps the solution unique
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 or None, got {self.lr}")
        if self.history < 1:
            raise ValueError(f"history must be >= 1, got {self.history}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {self.batch_size}")
        if self.optimizer == "lbfgs" and self.batch_size is not None:
            raise ValueError("batch_size (mini-batches) needs optimizer='adam'; L-BFGS runs full batch")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.probes < 1:
            raise ValueError(f"probes must be >= 1, got {self.probes}")


PBRF_OPTIONS = from_signature(PBRFConfig, *(OptionSpec(f.name) for f in fields(PBRFConfig)))
"""The options of :class:`PBRFConfig` (``groundtruth --pbrf-option``): type, default and choices read from it."""


def pbrf_config(options: Mapping[str, Any]) -> PBRFConfig:
    """:class:`PBRFConfig` of ``options`` (``groundtruth --pbrf-option key=value``), checked and converted by
    :func:`~wherefrom.core.options.check_options` against :data:`PBRF_OPTIONS` as every method's options are (an
    int given for a float becomes a float, so ``lr=1`` and ``lr=1.0`` key the same cached rows; text is read as
    JSON). Raises :class:`~wherefrom.core.options.OptionError` (a ``ValueError``) naming an unknown key with the
    known ones, or the key, the value and what is allowed (``eps=nan`` reaches here as the text ``'nan'``), and
    :class:`PBRFConfig`'s own range errors; ``groundtruth`` calls it before any fine-tuning."""
    return PBRFConfig(**check_options("PBRF", PBRF_OPTIONS, options))


@contextmanager
def _only_tracked_trainable(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Inside: the tracked ``params`` require grad, every other parameter does not; flags and ``.grad``
    restored after."""
    tracked = {id(p) for p in params}
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in tracked)
        if id(p) in tracked:
            p.grad = None
    try:
        yield
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad


class _Problem:
    """The PBRF objective of one model, training set and damping; solves it for any row and ``eps``.

    Mutates the tracked parameters in place while solving; :meth:`reset` puts ``theta_s`` back.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Sequence[TrackedModule],
        train: list[EncodedExample],
        pad: int,
        batch_size: int,
        config: PBRFConfig,
    ):
        self.model, self.modules, self.train, self.pad = model, list(modules), train, pad
        self.batch_size, self.config = batch_size, config
        self.params = [p for m in self.modules for p in m.parameters()]
        self.theta_s = [p.detach().clone() for p in self.params]
        self.device = self.params[0].device
        self.reference = self._reference()  # per row: logits z_s at theta_s on completion positions, (t_i, V)
        self.lam = 0.0

    # --- data --------------------------------------------------------------------------------------
    def _batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = collate([self.train[i] for i in indices], self.pad)
        return {k: v.to(self.device) for k, v in batch.items()}

    def chunks(self, indices: Sequence[int] | None = None) -> list[list[int]]:
        rows = list(range(len(self.train))) if indices is None else list(indices)
        return [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def _completion_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at completion positions ``(tokens, V)`` (rows in order; at least float32) and their
        target token ids ``(tokens,)``."""
        logits, targets, _ = completion_predictions(self.model, batch)
        return logits.to(torch.promote_types(logits.dtype, torch.float32)), targets

    @torch.no_grad()
    def _reference(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for chunk in self.chunks():
            batch = self._batch(chunk)
            logits, _ = self._completion_logits(batch)
            counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
            out += list(torch.split(logits, counts))
        return out

    # --- objective ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Put ``theta_s`` back into the tracked parameters."""
        with torch.no_grad():
            for p, value in zip(self.params, self.theta_s):
                p.copy_(value)

    def _shifted(self, chunk: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the rows of ``chunk`` at completion positions, float64: ``d = z - z_s`` ``(tokens, V)``,
        ``p_s`` ``(tokens, V)``, ``log E_{p_s}[exp d] = lse(z) - lse(z_s)`` ``(tokens,)`` and targets.

        Both objective terms are written through ``d`` so that they lose no precision to cancellation
        when ``theta`` is close to ``theta_s`` (they are O(eps^2) and O(eps) there, while ``log p`` is O(1)).
        """
        logits, targets = self._completion_logits(self._batch(chunk))
        reference = torch.cat([self.reference[i] for i in chunk]).double()
        d = logits.double() - reference
        p_s = torch.softmax(reference, dim=-1)
        if float(d.detach().abs().max()) < 1:
            log_mean = torch.log1p((p_s * torch.expm1(d)).sum(-1))
        else:  # far from theta_s: the overflow-safe form
            log_mean = torch.logsumexp(torch.log(p_s) + d, dim=-1)
        return d, p_s, log_mean, targets

    def gradient(self, row: int, eps: float, indices: Sequence[int] | None = None) -> float:
        """Set ``.grad`` of the tracked parameters to the objective's gradient; return the objective
        minus its value at ``theta_s`` (``eps L(z_m, theta_s)``).

        ``indices``: the divergence rows to average over (``None``: all ``N``). Terms:
        ``KL(p_s || p) = log E_{p_s}[e^d] - E_{p_s}[d]`` and ``L - L_s = sum_t log E_{p_s}[e^d] - d[y]``.
        """
        for p in self.params:
            p.grad = None
        chunks = self.chunks(indices)
        count = sum(len(c) for c in chunks)
        total = 0.0
        for chunk in chunks:
            d, p_s, log_mean, _ = self._shifted(chunk)
            divergence = (log_mean - (p_s * d).sum(-1)).sum() / count  # mean_i sum_t KL(p_s || p_theta)
            divergence.backward()
            total += float(divergence.detach())
        d, _, log_mean, targets = self._shifted([row])
        loss = eps * (log_mean - d.gather(-1, targets[:, None]).squeeze(-1)).sum()  # eps (L(z_m) - L_s(z_m))
        loss.backward()
        total += float(loss.detach())
        with torch.no_grad():
            for p, p0 in zip(self.params, self.theta_s):
                delta = p - p0
                p.grad.add_(delta, alpha=self.lam)
                total += 0.5 * self.lam * float((delta.double() ** 2).sum())
        return total

    def grad_norms(self) -> tuple[float, float]:
        """``(max-abs, 2-norm)`` of the current ``.grad`` over the tracked parameters."""
        flat = torch.cat([p.grad.reshape(-1).double() for p in self.params])
        return float(flat.abs().max()), float(flat.norm())

    # --- solving -----------------------------------------------------------------------------------
    def _place(self, u: Sequence[torch.Tensor], size: float) -> None:
        """Tracked parameters <- ``theta_s + size * u``."""
        with torch.no_grad():
            for p, p0, v in zip(self.params, self.theta_s, u):
                p.copy_(p0 + size * v)

    def solve(
        self, row: int, eps: float, start: Sequence[torch.Tensor] | None, scale: float, seed: int
    ) -> tuple[dict[str, Any], list[torch.Tensor]]:
        """Minimise the objective for ``(row, eps)``; returns the report and the scaled displacement ``u``.

        The optimiser works on ``u = (theta - theta_s) / |eps|`` and the objective divided by
        ``eps^2``: both are O(1) whatever ``eps`` is, so L-BFGS's curvature pairs and tolerances do not
        vanish with ``eps``. ``start``: initial ``u`` (default 0, i.e. ``theta_s``); ``scale``: the
        max-abs gradient of the objective at ``theta_s`` (convergence is relative to it). The tracked
        parameters hold the solution afterwards.
        """
        c = self.config
        size = abs(eps)
        u = [
            (torch.zeros_like(p0) if start is None else v.clone()).requires_grad_(True)
            for p0, v in zip(self.theta_s, start or self.theta_s)
        ]
        began = time.perf_counter()
        evaluations = 0

        def closure(indices: Sequence[int] | None = None) -> float:
            nonlocal evaluations
            evaluations += 1
            self._place(u, size)
            value = self.gradient(row, eps, indices)
            for v, p in zip(u, self.params):
                v.grad = p.grad / size  # d(Q / eps^2) / du = grad_theta Q / |eps|
            return value / size**2

        if c.optimizer == "lbfgs":
            optimizer = torch.optim.LBFGS(
                u,
                lr=c.lr or 1.0,
                max_iter=c.steps,
                max_eval=4 * c.steps,
                history_size=c.history,
                tolerance_grad=c.tol * scale / size,
                tolerance_change=0.0,
                line_search_fn="strong_wolfe",
            )
            optimizer.step(closure)  # type: ignore[arg-type]
            iterations = int(optimizer.state[u[0]].get("n_iter", 0))
        else:
            optimizer = torch.optim.Adam(u, lr=c.lr or 1e-3)
            generator = torch.Generator().manual_seed(seed)
            n = len(self.train)
            iterations = 0
            for _ in range(c.steps):
                indices = None
                if c.batch_size is not None and c.batch_size < n:
                    indices = sorted(torch.randperm(n, generator=generator)[: c.batch_size].tolist())
                closure(indices)
                if indices is None and self.grad_norms()[0] <= c.tol * scale:
                    break
                optimizer.step()
                iterations += 1
        self._place(u, size)
        objective = self.gradient(row, eps)  # the full gradient at the final point
        evaluations += 1
        max_abs, norm = self.grad_norms()
        for p in self.params:
            p.grad = None
        relative = max_abs / scale if scale > 0 else 0.0
        report = {
            "iterations": iterations,
            "evaluations": evaluations,
            "objective": objective,
            "grad_max_abs": max_abs,
            "grad_norm": norm,
            "relative_grad": relative,
            "converged": bool(relative <= c.tol and math.isfinite(objective)),
            "seconds": time.perf_counter() - began,
        }
        return report, [v.detach() for v in u]


def _measure(model: nn.Module, queries: list[EncodedExample], pad: int, batch_size: int, device) -> torch.Tensor:
    """``f(z_q) = log p(completion | prompt)`` of every query, ``(n_query,)`` float64 (nats)."""
    values = []
    with torch.no_grad():
        for start in range(0, len(queries), batch_size):
            batch = {k: v.to(device) for k, v in collate(queries[start : start + batch_size], pad).items()}
            logits = model(**model_inputs(model, batch)).logits
            values.append(-per_example_loss(logits.double(), batch["labels"], "sum").cpu())
    return torch.cat(values)


def _resolve_rows(rows: Sequence[int | str], train: Sequence[Record]) -> list[int]:
    if not rows:
        raise ValueError("rows must name at least one training row (an index or an id)")
    index = {r.id: i for i, r in enumerate(train)}
    out = []
    for row in rows:
        if isinstance(row, str):
            if row not in index:
                raise ValueError(f"rows: no training row has id {row!r}")
            out.append(index[row])
        elif isinstance(row, int) and not isinstance(row, bool):
            if not 0 <= row < len(train):
                raise ValueError(f"rows: index {row} out of range for {len(train)} training rows")
            out.append(row)
        else:
            raise TypeError(f"rows: expected int indices or str ids, got {row!r}")
    return out


def _fingerprint(
    params: Sequence[torch.Tensor], train: Sequence[EncodedExample], queries: Sequence[EncodedExample]
) -> str:
    """sha256 of the tracked weights and the token ids of train and queries (the cache key's data part)."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for example in (*train, *queries):
        digest.update(json.dumps([example.id, example.input_ids, example.labels]).encode())
    return digest.hexdigest()


def _damping(problem: _Problem, config: PBRFConfig, info: dict[str, Any]) -> float:
    if config.damping is not None:
        return float(config.damping)
    batches = [problem._batch(chunk) for chunk in problem.chunks()]
    operator = GGNOperator(problem.model, problem.modules, lambda: batches)
    mean, estimate = operator.mean_eigenvalue(config.probes, config.seed)
    info.update(estimate)
    lam = relative_damping(None, config.damping_factor, mean, "PBRF objective (all tracked parameters)")
    if lam <= 0:
        raise ValueError(
            f"the default PBRF damping is {lam:g} (trace(G) estimate {estimate['trace_estimate']:g}): the tracked "
            "parameters get no curvature on these rows; pass an absolute damping > 0"
        )
    return lam


def pbrf_influence(
    model: nn.Module,
    tokenizer,
    train: Sequence[Record],
    queries: Sequence[Record],
    rows: Sequence[int | str],
    config: PBRFConfig | None = None,
    attribution: AttributionConfig | None = None,
    progress: Progress = no_progress,
    info: dict[str, Any] | None = None,
    cache: str | Path | None = None,
    replace: bool = True,
) -> torch.Tensor:
    """PBRF influence of each training row in ``rows`` on every query: ``(n_query, len(rows))`` float64.

    Column ``j`` is ``(f(z_q; theta_{+eps}) - f(z_q; theta_{-eps})) / (2 eps)`` for row ``rows[j]``
    (an index into ``train`` or a row id), in the units and sign of influence scores (positive =
    proponent); it tends to ``exact`` influence (``blocks="full"``, same absolute damping, same
    tracked modules) as ``eps -> 0``. ``attribution`` supplies ``include``/``exclude``,
    ``batch_size``, ``max_length`` and ``chat_template`` (``reduction`` must be ``"sum"``).

    ``info`` (if given) receives ``damping``, ``eps``, ``parameters`` and per row the solves'
    iterations, objective-gradient norms (``relative_grad``: max-abs gradient over its value at
    ``theta_s``), convergence and seconds; ``all_converged``. ``cache``: a folder where each row's
    column is written atomically (``row-<index>.json``) and reused by a rerun with the same settings,
    weights and data; with ``replace=False`` a cached row of other settings, weights or data is refused
    (:class:`wherefrom.core.store.OutputExists`, :func:`wherefrom.studies.toolkit.refuse_replacing`) before any row is
    solved, not recomputed. The model's weights are restored after every row, also on error.
    """
    config = config or PBRFConfig()
    attribution = attribution or AttributionConfig()
    if attribution.reduction != "sum":
        raise ValueError(
            f"PBRF uses the summed completion loss; attribution.reduction={attribution.reduction!r} is not supported"
        )
    train, queries = check_records(train, "train (training rows)"), check_records(queries, "queries (query rows)")
    indices = _resolve_rows(rows, train)
    info = info if info is not None else {}
    if config.float64 and next(model.parameters()).dtype != torch.float64:
        model = copy.deepcopy(model).double()
    modules = select_modules(model, attribution.include, attribution.exclude)
    pad = pad_id(tokenizer)
    encoded = encode_records(train, tokenizer, model=model, **attribution.layout())
    encoded_queries = encode_records(queries, tokenizer, model=model, **attribution.layout())
    eps = config.eps if config.eps is not None else 1.0 / len(train)
    folder = Path(cache) if cache is not None else None

    with eval_mode(model):
        problem = _Problem(model, modules, encoded, pad, attribution.batch_size, config)
        with _only_tracked_trainable(model, problem.params):
            key = None
            if folder is not None:
                key = {
                    "format": _FORMAT_VERSION,
                    "config": asdict(config),
                    "eps": eps,
                    "modules": [m.name for m in modules],
                    "data": _fingerprint(problem.params, encoded, encoded_queries),
                }
                if not replace:
                    refuse_replacing((folder / f"row-{row}.json", key) for row in indices)
            base = _measure(model, encoded_queries, pad, attribution.batch_size, problem.device)
            problem.lam = _damping(problem, config, info)
            info.update(
                damping=problem.lam,
                eps=eps,
                parameters=sum(p.numel() for p in problem.params),
                train_rows=len(train),
                symmetric=config.symmetric,
                optimizer=config.optimizer,
                rows=[],
            )
            columns = []
            try:
                for j, row in enumerate(progress(indices, "PBRF rows")):  # type: ignore[arg-type]
                    path = folder / f"row-{row}.json" if folder is not None else None
                    saved = cached(path, key) if path is not None else None
                    if saved is not None:
                        columns.append(torch.tensor(saved["column"], dtype=torch.float64))
                        info["rows"].append({**saved["report"], "reused": True})
                        continue
                    column, report = _one_row(
                        problem, row, eps, base, encoded_queries, pad, attribution.batch_size, config.seed + j
                    )
                    report["id"] = train[row].id
                    columns.append(column)
                    info["rows"].append(report)
                    if path is not None:
                        store(path, key, {"column": column.tolist(), "report": report})
            finally:
                problem.reset()
    failed = [r["id"] for r in info["rows"] if not r["converged"]]
    info["all_converged"] = not failed
    if failed:
        worst = max(s["relative_grad"] for r in info["rows"] for s in r["solves"])
        warnings.warn(
            f"PBRF did not converge for {len(failed)} of {len(indices)} rows (e.g. {failed[:3]}): relative objective "
            f"gradient up to {worst:.2e} > tol={config.tol:g}; raise steps, use a float64 model, or loosen tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return torch.stack(columns, dim=1)


def _one_row(
    problem: _Problem,
    row: int,
    eps: float,
    base: torch.Tensor,
    queries: list[EncodedExample],
    pad: int,
    batch_size: int,
    seed: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One row's column ``(n_query,)`` and its report; leaves ``theta_s`` in the model."""
    problem.reset()
    problem.gradient(row, eps)  # at theta_s only the eps L term has a gradient
    scale = problem.grad_norms()[0]
    plus, u = problem.solve(row, eps, None, scale, seed)
    f_plus = _measure(problem.model, queries, pad, batch_size, problem.device)
    solves = [{"sign": 1, **plus}]
    if problem.config.symmetric:
        # first-order guess: theta_{-eps} ~ 2 theta_s - theta_{+eps}
        minus, _ = problem.solve(row, -eps, [-v for v in u], scale, seed + 10_000)
        f_minus = _measure(problem.model, queries, pad, batch_size, problem.device)
        solves.append({"sign": -1, **minus})
        column = (f_plus - f_minus) / (2 * eps)
    else:
        column = (f_plus - base) / eps
    problem.reset()
    report = {
        "index": row,
        "initial_grad_max_abs": scale,
        "solves": solves,
        "converged": all(s["converged"] for s in solves),
    }
    return column, report
