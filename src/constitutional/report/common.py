"""What every report section uses: the run directory's files read once (`RunFiles`), a section's
"missing" signal, and the formatting helpers (tables, figures, numbers). Every piece of text from a
record is HTML-escaped here."""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..run import read_jsonl
from . import plots


class Missing(Exception):
    """A section's inputs are absent (or unreadable); the message is the one-line note shown instead."""


@dataclass
class Section:
    key: str  # id on the page and name in the stage summary
    title: str
    body: str = ""  # HTML; empty when the section is missing
    missing: str = ""  # the one-line note shown instead


class RunFiles:
    """Reads the run directory's files once each; None when a file is absent."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest, self._cache = path, manifest, {}

    def json(self, rel: str) -> Any:
        if rel not in self._cache:
            p = self.path / rel
            try:
                self._cache[rel] = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise Missing(f"unreadable: {rel} ({e}); rerun the stage that writes it") from None
        return self._cache[rel]

    def jsonl(self, rel: str) -> list[dict] | None:
        p = self.path / rel
        if not p.is_file():
            return None
        try:
            return read_jsonl(p)
        except UserError as e:
            raise Missing(f"unreadable: {e}") from None

    def summary(self, stage: str) -> dict:
        return as_dict(as_dict(as_dict(self.manifest.get("stages")).get(stage)).get("summary"))


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any) -> str:
    """A value for a table cell: numbers rounded for reading, intervals as [lo, hi], None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        return f"{v:,.0f}" if math.isfinite(v) and abs(v) >= 1e4 else f"{v:.4g}"  # 4 significant digits
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return ", ".join(f"{k} {fmt(x)}" for k, x in v.items())
    return str(v)


def with_ci(v: Any, ci: Any) -> str:
    return fmt(v) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "")


def pct(v: Any) -> str:
    """A rate (a share in [0, 1]) as a percentage: whole percents from 10%, one decimal below
    ("12%", "2.5%", "0%"; float noise such as 2.8e-17 shows as 0%); other values as `fmt`."""
    if not num(v):
        return fmt(v)
    p = 100 * v
    text = f"{p:.0f}" if abs(p) >= 9.95 else f"{p:.1f}".removesuffix(".0")
    return ("0" if text == "-0" else text) + "%"


def pct_ci(v: Any, ci: Any) -> str:
    """A rate and its interval as percentages: "12% [5%, 26%]"."""
    return pct(v) + (f" [{pct(ci[0])}, {pct(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else "")


def table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    """An HTML table; every cell is formatted with `fmt` and escaped."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c if isinstance(c, str) else fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def figure(img: plots.Image, caption: str) -> str:
    return (f'<figure style="width:{img.width}px"><img src="{img.uri}" width="{img.width}" height="{img.height}" alt="{esc(caption)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def bars(groups: dict, title: str, ylabel: str, caption: str, **kw) -> str:
    """A grouped bar figure (`plots.grouped_bars`), or "" when no bar has a value."""
    if not any(num(b[0] if isinstance(b, tuple) else b) for g in groups.values() for b in g.values()):
        return ""
    return figure(plots.grouped_bars(groups, title, ylabel, **kw), caption)


def figs(*items: str) -> str:
    return '<div class="figs">' + "".join(items) + "</div>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def text_block(label: str, text: Any, cls: str = "text") -> str:
    return f'<div class="block"><div class="label">{esc(label)}</div><div class="{cls}">{esc(text if text is not None else "–")}</div></div>'


def scalars(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts to (dotted key, value) for every number, string, bool or short list."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += scalars(v, f"{prefix}{k}.")
        elif v is None or isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and len(v) <= 4 and all(num(x) for x in v)):
            out.append((f"{prefix}{k}", v))
    return out


def as_dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {}


def as_list(x: Any) -> list:
    return x if isinstance(x, list) else [x] if x else []


def spec_name(spec: str) -> str:
    return Path(spec).name if "/" in spec else spec


def step_series(records: Any, key: str, std: str | None = None) -> tuple[list, list, list | None]:
    """(steps, values of `key`, values of `std` or 0) over the records that have a number for `key`;
    the record's position stands in for a missing step; the third item is None without `std`."""
    rows = [e for e in as_list(records) if isinstance(e, dict)]
    pts = [(e["step"] if num(e.get("step")) else i + 1, e[key], e.get(std) if num(e.get(std)) else 0.0)
           for i, e in enumerate(rows) if num(e.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts] if std else None


def bins_of(bins: Any, conf: str, acc: str) -> list[tuple[float, float, int]]:
    return [(b.get(conf), b.get(acc), b.get("count") if num(b.get("count")) else 0) for b in as_list(bins) if isinstance(b, dict)]
