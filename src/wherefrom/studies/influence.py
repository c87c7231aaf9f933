"""Grosse et al. (2023)'s analyses of where influence lives: by layer and module type, and in the tail.

Inputs are :class:`wherefrom.core.scoring.Scores` (sign: positive = proponent); outputs are plain dicts
(JSON-ready) that the HTML report renders.

**By layer** (Grosse et al., section 5.3.1). For query ``q``, module ``m`` and training row ``n`` the
score splits as ``I(q, n) = sum_m I_m(q, n)`` (``Scores.per_module``). The share of a group ``L`` of
modules (one layer, or one module type: attention / MLP / LoRA A / LoRA B / other) is

    abs_share(L, q) = sum_{m in L} sum_n |I_m(q, n)|     / sum_m sum_n |I_m(q, n)|
    pos_share(L, q) = sum_{m in L} sum_n max(I_m(q, n), 0) / sum_m sum_n max(I_m(q, n), 0)

so each sums to 1 over the groups (NaN when the denominator is 0). ``n`` runs over all training rows,
or over the query's top proponents for the "top proponents" profile: its ``top_k`` rows of largest total score,
those with a total score > 0 alone (a query with fewer proponents counts those; one with none is left out of
that profile's means, ``n``).
Means over queries carry a 95% percentile bootstrap interval (:func:`wherefrom.studies.metrics.bootstrap_ci`).

**The tail** (Grosse et al., section 5.2.1). For one query's scores over ``N`` rows, the share of the
total positive influence ``sum_n max(I_n, 0)`` held by the ``ceil(f N)`` rows with the largest score
(``f`` = 1% and 10%), and a power-law fit ``p(x) ~ x^-alpha`` for ``x >= x_min`` of the positive
scores by the ``powerlaw`` package (Alstott et al., 2014: maximum likelihood ``alpha``, ``x_min``
minimising the Kolmogorov-Smirnov distance), with the interval ``alpha +- 1.96 sigma`` (``sigma``:
the estimator's standard error) and the normalised log-likelihood ratio ``R`` against a log-normal
(``R > 0`` favours the power law; ``p`` its two-sided significance, Clauset et al., 2009).
Grosse et al. report exponents between 2 and 4.3.

**Agreement** between methods: for two score sets over the same queries and rows, the mean over
queries of the Spearman correlation of their total scores across training rows.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from wherefrom.core.scoring import TOP_K, Scores
from wherefrom.studies.groundtruth.lds import spearman_rows
from wherefrom.studies.metrics import bootstrap_ci

MODULE_KINDS = ("attention", "mlp", "lora_A", "lora_B", "other")
"""Module types of the by-type profile, in display order."""
TAIL_FRACTIONS = (0.01, 0.1)
"""Fractions of the training rows whose share of the positive influence the tail analysis reports."""
MIN_TAIL_VALUES = 10
"""Fewest positive scores a power-law fit is attempted on."""

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
_ATTENTION = re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value")
_MLP = re.compile(r"mlp|ffn|feed_forward|gate_proj|up_proj|down_proj|c_fc|fc\d")


def module_kind(name: str) -> str:
    """The type of a tracked module from its name: one of :data:`MODULE_KINDS`.

    LoRA factors (``...lora_A...`` / ``...lora_B...``) are their own types whatever they adapt.
    """
    if ".lora_A" in name:
        return "lora_A"
    if ".lora_B" in name:
        return "lora_B"
    if _ATTENTION.search(name):
        return "attention"
    if _MLP.search(name):
        return "mlp"
    return "other"


def module_layer(name: str) -> int | None:
    """The transformer block index in a module name (``model.layers.3.mlp.up_proj`` -> 3); ``None`` outside blocks."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def short_names(names: list[str]) -> dict[str, str]:
    """Each dotted module name without the leading and trailing parts that all ``names`` share
    (``base_model.model.model.layers.3.self_attn.q_proj.lora_A.default`` -> ``3.self_attn.q_proj.lora_A``),
    keeping at least one part, so a table column holds it at 80 columns."""
    parts = [name.split(".") for name in names]
    shortest = min((len(p) for p in parts), default=0)

    def shared(reverse: bool) -> int:
        count = 0
        while count < shortest - 1 and len({p[-1 - count] if reverse else p[count] for p in parts}) == 1:
            count += 1
        return count

    if len(names) < 2:
        return {name: name for name in names}
    head = shared(False)
    tail = min(shared(True), shortest - 1 - head)
    return {name: ".".join(p[head : len(p) - tail]) for name, p in zip(names, parts)}


def _layer_label(name: str) -> str:
    layer = module_layer(name)
    return "other" if layer is None else str(layer)


def group_shares(per_module: np.ndarray, groups: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Shares of ``|influence|`` and of positive influence per group of modules, for each query.

    ``per_module``: ``(n_modules, n_query, n_rows)``; ``groups``: one label per module. Returns
    ``(labels, abs_share, pos_share)``, both ``(n_query, n_groups)``, rows summing to 1 (NaN for a
    query whose scores are all zero, resp. none positive). ``labels`` keep first-seen order.
    """
    per_module = np.asarray(per_module, dtype=np.float64)
    if per_module.ndim != 3 or per_module.shape[0] != len(groups):
        raise ValueError(f"per_module must be (n_modules={len(groups)}, n_query, n_rows), got {per_module.shape}")
    labels = list(dict.fromkeys(groups))
    member = np.array([[g == label for g in groups] for label in labels], dtype=np.float64)  # (G, M)
    absolute = member @ np.abs(per_module).sum(2)  # (G, Q)
    positive = member @ np.clip(per_module, 0, None).sum(2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return labels, (absolute / absolute.sum(0)).T, (positive / positive.sum(0)).T


def _summary(labels: Sequence[str], shares: np.ndarray) -> dict[str, dict[str, float]]:
    """``{label: {mean, low, high, n}}`` over the queries with a finite value (bootstrap interval;
    ``low``/``high`` ``None`` for one query)."""
    out = {}
    for j, label in enumerate(labels):
        finite = shares[:, j][np.isfinite(shares[:, j])]
        if finite.size:
            mean, low, high = bootstrap_ci(finite)
            interval = (low, high) if finite.size > 1 else (None, None)
            out[label] = {"mean": mean, "low": interval[0], "high": interval[1], "n": int(finite.size)}
    return out


def _profile(per_module: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    profile: dict[str, Any] = {}
    for key, groups in (("by_layer", [_layer_label(n) for n in names]), ("by_kind", [module_kind(n) for n in names])):
        labels, absolute, positive = group_shares(per_module, groups)
        if key == "by_kind":
            order = sorted(range(len(labels)), key=lambda j: MODULE_KINDS.index(labels[j]))
            labels, absolute, positive = [labels[j] for j in order], absolute[:, order], positive[:, order]
        profile[key] = {
            "labels": labels,
            "abs_share": _summary(labels, absolute),
            "pos_share": _summary(labels, positive),
            "per_query_abs_share": absolute.tolist(),
        }
    return profile


def layer_profile(scores: Scores, top_k: int = TOP_K) -> dict[str, Any]:
    """By-layer and by-module-type shares of influence, over all rows and over each query's top proponents.

    Returns ``{"all": P, "top": P, "top_k": k, "modules": [...]}`` where ``P`` holds ``by_layer`` and
    ``by_kind``, each ``{labels, abs_share, pos_share, per_query_abs_share}``: ``abs_share[label]`` /
    ``pos_share[label]`` are ``{mean, low, high, n}`` over queries (see the module docstring), and
    ``per_query_abs_share`` is ``(n_query, n_groups)``. ``"top"`` restricts each query to its top ``top_k``
    proponents: of its ``top_k`` rows by total score, those scoring > 0 (``"proponents"``: how many, per
    query; rows of score <= 0 were counted as proponents, a query with one positive score among its top 10 had
    its "top 10 proponents" share taken over 10 rows). NaN scores (rows a prefilter did not score) count as 0 in
    the shares and are never among the top rows.
    Raises ``ValueError`` for ``top_k < 1``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    per_module = scores.per_module.detach().cpu().double().numpy()
    per_module = np.nan_to_num(per_module, nan=0.0)
    total = np.nan_to_num(scores.total.detach().cpu().double().numpy(), nan=-np.inf)
    k = min(top_k, total.shape[1])
    ranked = np.argsort(-total, axis=1, kind="stable")[:, :k]  # (Q, k)
    proponents = np.take_along_axis(total, ranked, axis=1) > 0  # (Q, k)
    top = np.stack([per_module[:, q, ranked[q]] * proponents[q] for q in range(total.shape[0])], axis=1)  # (M, Q, k)
    return {
        "modules": list(scores.module_names),
        "top_k": k,
        "proponents": proponents.sum(1).tolist(),
        "all": _profile(per_module, scores.module_names),
        "top": _profile(top, scores.module_names),
    }


def top_name(profile: Mapping[str, Any]) -> str:
    """The name of a :func:`layer_profile`'s ``"top"`` rows: ``top 10 proponents``, saying how many queries have
    fewer rows of score > 0 (``top 10 proponents (score > 0; 2 of 6 queries have fewer)``)."""
    k, counts = profile["top_k"], profile["proponents"]
    fewer = sum(count < k for count in counts)
    return f"top {k} proponents" + (f" (score > 0; {fewer} of {len(counts)} queries have fewer)" if fewer else "")


def tail_shares(row: np.ndarray, fractions: Sequence[float] = TAIL_FRACTIONS) -> dict[str, float]:
    """Share of a query's total positive influence held by its top ``ceil(f N)`` rows, for each ``f``.

    ``row``: ``(N,)`` scores of one query (NaN = not scored, left out). Keys are ``"top_1%"``-style
    labels; NaN when no score is positive. Raises ``ValueError`` for a fraction outside ``(0, 1]``.
    """
    values = np.asarray(row, dtype=np.float64)
    values = values[np.isfinite(values)]
    positive_total = np.clip(values, 0, None).sum()
    ordered = np.sort(values)[::-1]
    out = {}
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"tail fractions must lie in (0, 1], got {f}")
        k = max(1, math.ceil(f * values.size))
        held = np.clip(ordered[:k], 0, None).sum()
        out[f"top_{f * 100:g}%"] = float(held / positive_total) if positive_total > 0 else float("nan")
    return out


def power_law_fit(values: np.ndarray) -> dict[str, Any]:
    """Power-law fit of the positive entries of ``values`` with the ``powerlaw`` package (see module docstring).

    Returns ``{alpha, sigma, alpha_low, alpha_high, xmin, n_tail, n_positive, lognormal_R,
    lognormal_p}``: ``alpha`` the exponent of ``p(x) ~ x^-alpha`` above ``xmin`` (``n_tail`` values),
    its 95% interval ``alpha +- 1.96 sigma``, and the log-likelihood-ratio test against a log-normal
    (``R > 0`` favours the power law). Raises ``ValueError`` with fewer than :data:`MIN_TAIL_VALUES`
    positive values.
    """
    import powerlaw

    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x) & (x > 0)]
    if x.size < MIN_TAIL_VALUES:
        raise ValueError(f"a power-law fit needs at least {MIN_TAIL_VALUES} positive scores, got {x.size}")
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # powerlaw warns about the numerics of its log-normal fits
        fit = powerlaw.Fit(x, discrete=False, verbose=False)
        ratio, p = fit.distribution_compare("power_law", "lognormal", normalized_ratio=True)
    alpha, sigma = float(fit.power_law.alpha), float(fit.power_law.standard_err)
    return {
        "alpha": alpha,
        "sigma": sigma,
        "alpha_low": alpha - 1.96 * sigma,
        "alpha_high": alpha + 1.96 * sigma,
        "xmin": float(fit.xmin),
        "n_tail": int((x >= fit.xmin).sum()),
        "n_positive": int(x.size),
        "lognormal_R": float(ratio),
        "lognormal_p": float(p),
    }


def tail_profile(scores: Scores, fractions: Sequence[float] = TAIL_FRACTIONS) -> dict[str, Any]:
    """The tail analysis of every query: ``{"per_query": [...], "shares": {label: stat}, "alpha": stat}``.

    Each ``per_query`` entry is ``{"query": id, "shares": tail_shares(...), "fit": power_law_fit(...)
    or None, "fit_error": message or None}``. ``shares`` and ``alpha`` are means over queries with a
    bootstrap interval (``{mean, low, high, n}``), over the queries where they are defined.
    """
    total = scores.total.detach().cpu().double().numpy()
    per_query = []
    for q, query_id in enumerate(scores.query_ids):
        entry: dict[str, Any] = {"query": query_id, "shares": tail_shares(total[q], fractions), "fit": None}
        try:
            entry["fit"], entry["fit_error"] = power_law_fit(total[q]), None
        except ValueError as error:
            entry["fit_error"] = str(error)
        per_query.append(entry)
    labels = list(per_query[0]["shares"]) if per_query else []
    shares = np.array([[e["shares"][label] for label in labels] for e in per_query]).reshape(len(per_query), -1)
    alphas = np.array([[e["fit"]["alpha"] if e["fit"] else np.nan] for e in per_query]).reshape(len(per_query), 1)
    return {
        "per_query": per_query,
        "shares": _summary(labels, shares),
        "alpha": _summary(["alpha"], alphas).get("alpha"),
    }


def agreement(named: Mapping[str, Scores]) -> dict[str, Any]:
    """Method-vs-method agreement: ``{labels, matrix}``, ``matrix[i][j]`` the mean per-query Spearman
    correlation of the total scores of ``labels[i]`` and ``labels[j]`` across training rows (NaN scores,
    as from a prefilter, make a query's correlation undefined; undefined queries are left out; ``None``
    when no query is defined). Raises ``ValueError`` when the score sets disagree on query or row ids.
    """
    labels = list(named)
    first = named[labels[0]] if labels else None
    totals = {}
    for label in labels:
        scores = named[label]
        if scores.query_ids != first.query_ids or scores.train_ids != first.train_ids:
            raise ValueError(f"score sets {labels[0]!r} and {label!r} cover different queries or training rows")
        totals[label] = scores.total.detach().cpu().double().numpy()
    matrix = []
    for a in labels:
        row = []
        for b in labels:
            per_query = spearman_rows(totals[a], totals[b])
            per_query = per_query[np.isfinite(per_query)]
            row.append(float(per_query.mean()) if per_query.size else None)
        matrix.append(row)
    return {"labels": labels, "matrix": matrix}
