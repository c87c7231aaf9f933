"""The HTML report a person reads: sections built from results, plots as inline SVG, one Jinja2 template.

:func:`write_report` reports on a run, query, bench, evaluate, diagnose or attribute result
(:mod:`wherefrom.studies.report.folders`); :func:`render` turns sections
(:mod:`wherefrom.studies.report.sections`) into one self-contained page.
"""

from wherefrom.studies.report.folders import report_sections, write_report
from wherefrom.studies.report.render import render, write_html

__all__ = ["render", "report_sections", "write_html", "write_report"]
