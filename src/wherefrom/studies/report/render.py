"""Render report sections (:mod:`wherefrom.studies.report.sections`) into one self-contained HTML page.

The page is the Jinja2 template ``templates/report.html.j2`` (package data) with autoescaping on: every
text from the data is escaped, only the SVG figures drawn by :mod:`wherefrom.studies.report.plots` are
inserted as markup. It loads nothing: styles are inline, figures are inline SVG, there is no script.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jinja2

from wherefrom.core.store import atomic_write_text
from wherefrom.studies.report.sections import heatmaps

TEMPLATE = "report.html.j2"
GENERATOR = r'<meta name="generator" content="wherefrom[ "]'
"""The generator tag the template writes in every page's head (a regular expression): a file holding it is a
wherefrom report, which ``report --out`` and ``query --html`` may replace (:func:`wherefrom.core.store.replaceable`)."""


def _version() -> str:
    try:
        return version("wherefrom")
    except PackageNotFoundError:
        return "unknown"


def has_tokens(sections: Sequence[dict[str, Any]]) -> bool:
    """Whether any block of ``sections`` shows a token heatmap (a ``tokens`` block, or ranked entries with token
    values): only then does the page's header explain their colours (userF: it did on every page)."""
    return any(
        block["type"] == "tokens" or (block["type"] == "entries" and heatmaps(block["entries"]))
        for section in sections
        for block in section["blocks"]
    )


def render(title: str, source: str, sections: Sequence[dict[str, Any]]) -> str:
    """The HTML page of ``sections`` under ``title``; ``source`` names what the report was made from."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("wherefrom.studies.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template(TEMPLATE).render(
        title=title, source=source, sections=sections, version=_version(), tokens=has_tokens(sections)
    )


def write_html(html: str, out: Path) -> Path:
    """Write ``html`` to ``out`` atomically (creating its folder); returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(html, out)
    return out
