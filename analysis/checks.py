"""Input checks shared by every fit: errors a user can act on name the column, the file and the fix."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd


class FitError(ValueError):
    """A table or an array that cannot be fitted as given; the message says which column/file and why."""


class NotEnoughPointsError(FitError):
    """Fewer usable points than the law needs. Analyses catch this and report "not enough points" instead."""


def require_columns(df: pd.DataFrame, columns: Iterable[str], source: str = "<table>") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FitError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                       f"available: {', '.join(map(str, df.columns))} (choose others with the --*-col options)")


def positive_array(values: object, name: str, source: str = "<table>") -> np.ndarray:
    """A 1-D float array with every value finite and > 0 (power laws live in log space)."""
    arr = np.asarray(values, dtype=float).reshape(-1)
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = ", ".join(f"row {i}: {arr[i]!r}" for i in rows[:3])
        raise FitError(f"{source}: column {name!r} has {len(rows)} non-positive or non-finite value(s) ({shown}"
                       f"{', ...' if len(rows) > 3 else ''}); power-law fits need values > 0 — drop those rows")
    return arr


def require_points(n_distinct: int, need: int, what: str, source: str = "<table>") -> None:
    if n_distinct < need:
        raise NotEnoughPointsError(f"{source}: not enough points for {what}: {n_distinct} distinct x value(s), "
                                   f"need at least {need}")
