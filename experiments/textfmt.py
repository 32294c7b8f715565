"""Plain-text tables and number formats for terminal output: `sweep plan`, `sweep status`, `models`, the benchmarks.

Standard library only (imported by the `ultramem` command line's fast paths). The Markdown/HTML report has its own
cell format (analysis/report.py), and fitted laws print their own formulas (analysis/fit.py).
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence
from typing import Any


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Container[int] = (),
                 rule: bool = True, strip: bool = True) -> str:
    """Fixed-width columns two spaces apart: the header, a rule of dashes (rule=True), then the rows.

    Cells are left-aligned, those of the columns in `right` right-aligned; strip=False keeps the padding of the
    last column (lines of equal width).
    """
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        text = "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return text.rstrip() if strip else text

    rule_line = [line(["-" * w for w in widths])] if rule else []
    return "\n".join([line(headers), *rule_line, *(line(r) for r in rows)])


def cell(v: Any) -> str:
    """A table cell: None -> '-', floats to 4 significant digits, anything else as str()."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def human(n: float | None, unit: str = "") -> str:
    """1.23e9 -> '1.23G' (SI prefixes up to Z, 3 significant digits; plain below 1000; None or nan -> '-')."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for prefix, scale in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale * 0.9995:  # 999.96k prints as 1M, not 1e+03k
            return f"{n / scale:.3g}{prefix}{unit}"
    return f"{n:.3g}{unit}"


def human_fixed(n: float) -> str:
    """1.234e9 -> '1.234G', 12345 -> '12.3K' (fixed decimals, so a column of counts lines up; `ultramem models`)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}" if unit != "K" else f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def decimal(x: float | None, digits: int = 4) -> str:
    """A loss: fixed `digits` decimals; None -> '-'."""
    return "-" if x is None else f"{x:.{digits}f}"


def hours(h: float) -> str:
    """GPU-hours: thousands separated from 100 up, 3 significant digits below."""
    if h >= 100:
        return f"{h:,.0f}"
    return f"{h:.3g}"


def duration(s: float | None) -> str:
    """Seconds as '1h05m' from an hour up, else '4m07s'; None -> '-'."""
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
