"""Render a study's self-contained HTML report and the index of all studies.

Everything the page shows is read from the study's result files; images are
inline base64 PNGs and the style sheet is embedded, so the page opens offline.
Jinja2 autoescaping is on: group labels such as ``<script>`` appear as text.
"""

from __future__ import annotations

import html
import importlib
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from hierpipe.io import write_text
from hierpipe.report.context import load_context
from hierpipe.report.format import num
from hierpipe.report.sections import SECTIONS


def _env() -> Environment:
    env = Environment(
        loader=PackageLoader("hierpipe", "report/templates"),
        autoescape=select_autoescape(["html", "j2"], default_for_string=True, default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = num
    return env


def render_study(study_dir: Path, study: str, config: dict[str, Any], seed: int, out: Path) -> None:
    """Write the study's ``report.html`` from its result files."""
    ctx = load_context(study_dir, study, config, seed)
    sections = []
    for name in SECTIONS:
        built = importlib.import_module(f"hierpipe.report.sections.{name}").build(ctx)
        if built is not None:
            sections.append((name, built))
    css = files("hierpipe.report").joinpath("templates/style.css").read_text(encoding="utf-8")
    page = _env().get_template("report.html.j2").render(ctx=ctx, sections=sections, css=css)
    write_text(page, out)


def render_index(reports: list[Path], out: Path) -> None:
    """Write ``index.html`` linking every study's report (paths relative to ``out``)."""
    items = []
    for r in sorted(reports):
        rel = Path(r).resolve().relative_to(out.resolve().parent)
        href, name = html.escape(rel.as_posix()), html.escape(rel.parent.as_posix())
        items.append(f'<li><a href="{href}">{name}</a></li>')
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>hierpipe studies</title></head><body><h1>hierpipe studies</h1><ul>\n"
        + "\n".join(items)
        + "\n</ul></body></html>\n"
    )
    write_text(page, out)
