"""The by-layer and tail analyses of one score set as tables: the rows the HTML report shows, and the
payload and Markdown of the ``influence.{json,md}`` files of ``wherefrom influence``.

The analyses themselves (their definitions, the paper they follow) are :mod:`wherefrom.studies.influence`;
this module only lays their results out, so the report and the files show the same cells. A table is
``(columns, rows)``, every cell a string (``mean [low, high]`` with a 95% interval over queries, ``–``
where a value is undefined). Sign as everywhere: positive = proponent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wherefrom.core.scoring import TOP_K, Scores
from wherefrom.studies.influence import layer_profile, tail_profile, top_name
from wherefrom.studies.toolkit import interval_cell, markdown_table, number

Table = tuple[list[str], list[list[str]]]
"""``(columns, rows)`` of one table; every cell a string."""

AXES = {"by_layer": "layer", "by_kind": "module type"}
"""The layer profile's groupings and the name of each one's column."""


def layer_table(profile: Mapping[str, Any], key: str) -> Table:
    """Shares of influence by ``key`` (``"by_layer"`` or ``"by_kind"``) of a :func:`layer_profile` result:
    one row per group with the share of ``|influence|`` and of positive influence over all rows, and of
    ``|influence|`` over each query's top proponents (each ``mean [95% interval]`` over queries)."""
    columns = [AXES[key], "|influence|, all rows", "positive, all rows", f"|influence|, {top_name(profile)}"]
    rows = [
        [
            label,
            interval_cell(profile["all"][key]["abs_share"].get(label)),
            interval_cell(profile["all"][key]["pos_share"].get(label)),
            interval_cell(profile["top"][key]["abs_share"].get(label)),
        ]
        for label in profile["all"][key]["labels"]
    ]
    return columns, rows


def tail_labels(tail: Mapping[str, Any]) -> list[str]:
    """The share labels (``top_1%``, ``top_10%``) of a :func:`tail_profile` result."""
    return list(tail["shares"]) or ["top_1%", "top_10%"]


def tail_summary_table(tail: Mapping[str, Any]) -> Table:
    """Means over queries [95% interval] of the top-share(s) and of the power-law exponent ``alpha``."""
    rows = [[label, interval_cell(tail["shares"].get(label))] for label in tail_labels(tail)]
    rows.append(["alpha", interval_cell(tail["alpha"], ".2f")])
    return ["", "mean"], rows


def tail_query_table(tail: Mapping[str, Any]) -> Table:
    """Per query: the top-shares, ``alpha`` [95% interval], ``xmin``, the rows above ``xmin`` and the
    log-likelihood ratio ``R`` (with ``p``) against a log-normal; the fit's error where it was not fitted."""
    labels = tail_labels(tail)
    rows = []
    for entry in tail["per_query"]:
        fit = entry["fit"] or {}
        alpha = (
            f"{number(fit.get('alpha'), '.2f')} [{number(fit.get('alpha_low'), '.2f')}, "
            f"{number(fit.get('alpha_high'), '.2f')}]"
        )
        rows.append(
            [
                entry["query"],
                *[number(entry["shares"].get(label)) for label in labels],
                alpha if fit else entry["fit_error"],
                number(fit.get("xmin"), ".3g"),
                str(fit.get("n_tail", "–")),
                number(fit.get("lognormal_R"), ".2f"),
                number(fit.get("lognormal_p"), ".2f"),
            ]
        )
    return ["query", *labels, "alpha [95%]", "xmin", "rows in tail", "R vs log-normal", "p"], rows


def markdown_cells(table: Table) -> Table:
    """``table`` with ``|`` escaped in every cell (``|influence|`` would otherwise split a Markdown cell)."""
    columns, rows = table
    return [c.replace("|", "\\|") for c in columns], [[c.replace("|", "\\|") for c in row] for row in rows]


def influence_tables(scores: Scores, top_k: int = TOP_K) -> dict[str, Any]:
    """The analyses of ``scores`` as one JSON-ready payload: ``{"shape": [n_query, n_train, n_modules],
    "layers": layer_profile(scores, top_k), "tail": tail_profile(scores)}``.

    Raises ``ValueError`` for ``top_k < 1`` (from :func:`layer_profile`).
    """
    return {
        "shape": [len(scores.query_ids), len(scores.train_ids), len(scores.module_names)],
        "layers": layer_profile(scores, top_k),
        "tail": tail_profile(scores),
    }


def influence_markdown(payload: Mapping[str, Any], title: str) -> str:
    """The tail and layer tables of an :func:`influence_tables` payload as Markdown (``command`` and
    ``seconds`` in the payload, when there, are stated under the title)."""
    n_query, n_train, n_modules = payload["shape"]
    lines = [f"# {title}", "", f"{n_query} queries x {n_train} training rows, {n_modules} tracked modules."]
    if payload.get("command"):
        lines.append(
            f"Command: `{payload['command']}`" + (f" ({payload['seconds']:.1f} s)" if "seconds" in payload else "")
        )
    lines += ["", "## The tail (Grosse et al. 2023, section 5.2.1)", ""]
    for caption, table in (
        ("Means over queries [95% bootstrap interval]", tail_summary_table(payload["tail"])),
        ("Per query", tail_query_table(payload["tail"])),
    ):
        lines += [f"{caption}:", "", markdown_table(*markdown_cells(table)), ""]
    layers = payload["layers"]
    lines += ["## Influence by layer and module type (Grosse et al. 2023, section 5.3.1)", ""]
    for key in AXES:
        lines += [
            f"Shares by {AXES[key]} (mean [95% bootstrap interval] over queries):",
            "",
            markdown_table(*markdown_cells(layer_table(layers, key))),
            "",
        ]
    return "\n".join(lines)
