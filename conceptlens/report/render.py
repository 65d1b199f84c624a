"""Turn analyzer results into the HTML report: sections of blocks, one Jinja2 template, local assets.

Every string that reaches the page goes through Jinja2's autoescaping, every table is also written
as CSV under ``tables/``, and every figure is a local PNG under ``assets/`` (no CDN, no script).
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np

from .. import __version__

__all__ = ["Page", "render_page", "table_block", "image_block"]

_TEMPLATES = Path(__file__).with_name("templates")


@dataclass
class Page:
    """Where a report is written, and its sections as they are built.

    Attributes
    ----------
    out : Path
        Report folder (``index.html``, ``assets/``, ``tables/``).
    sections : list of dict
        ``{"id", "title", "blocks", "skipped"}`` in page order.
    """

    out: Path
    sections: list = field(default_factory=list)

    def __post_init__(self):
        self.out = Path(self.out)
        for sub in ("assets", "tables"):  # written anew: no figure or table of an earlier build lingers
            shutil.rmtree(self.out / sub, ignore_errors=True)
            (self.out / sub).mkdir(parents=True)

    def asset(self, name):
        """Path of a new figure file ``assets/<name>``."""
        return self.out / "assets" / name

    def section(self, sid, title, blocks=(), skipped=None):
        blocks = [{"title": None, "text": None, **b} for b in blocks]
        self.sections.append({"id": sid, "title": title, "blocks": blocks, "skipped": skipped})

    def table(self, frame, name):
        """Write ``tables/<name>.csv``; return its relative path."""
        frame.to_csv(self.out / "tables" / f"{name}.csv", index=False)
        return f"tables/{name}.csv"


def _cell(v):
    if isinstance(v, (float, np.floating)):
        return "" if np.isnan(v) else f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    return str(v)


def table_block(page, frame, name, title=None, text=None, max_rows=40):
    """A table block (first ``max_rows`` rows) whose full content goes to ``tables/<name>.csv``."""
    csv = page.table(frame, name)
    shown = frame.head(max_rows)
    return {
        "kind": "table", "title": title, "text": text, "columns": [str(c) for c in frame.columns],
        "rows": [[_cell(v) for v in row] for row in shown.itertuples(index=False)],
        "truncated": max(0, len(frame) - len(shown)), "csv": csv,
    }


def image_block(page, path, alt, title=None, caption=None, text=None):
    return {"kind": "image", "title": title, "text": text, "alt": alt, "caption": caption,
            "src": Path(path).relative_to(page.out).as_posix()}


def render_page(page, title, model, manifest, stages, spec_dict):
    """Write ``index.html``, ``assets/style.css`` and ``spec.json``; return the index path."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    html = env.get_template("report.html.j2").render(
        title=title, version=__version__, model=model, manifest=manifest, sections=page.sections, stages=stages,
        built=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    shutil.copyfile(_TEMPLATES / "style.css", page.out / "assets" / "style.css")
    (page.out / "spec.json").write_text(json.dumps(spec_dict, indent=1) + "\n")
    index = page.out / "index.html"
    index.write_text(html, encoding="utf-8")
    return index
