"""Input checks shared by every fit: errors a user can act on name the column, the file, the row and the fix.

Rows are counted as a user counts them in a spreadsheet: data row 1 is the first row below the header. For a CSV
read by `analysis.collect.load_table(path, lines=True)` the message also gives the line of the file (data row N is
line N + 1 when the file has no blank lines: the header is line 1).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd


class FitError(ValueError):
    """A table or an array that cannot be fitted as given; the message says which column/file and why."""


class NotEnoughPointsError(FitError):
    """Fewer usable points than the law needs. Analyses catch this and report "not enough points" instead."""


SHOWN = 3  # bad cells quoted in one message


def require_columns(df: pd.DataFrame, columns: Iterable[str], source: str = "<table>") -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FitError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                       f"available: {', '.join(map(str, df.columns))} (choose others with the --*-col options)")


def plain(value: object) -> str:
    """A cell as a user would type it: 'abc' for text, nan, -4e+15, 3 (never np.float64(...))."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.10g}"
    return repr(value)


def _cells(shown: list[str], total: int) -> str:
    return ", ".join(shown[:SHOWN]) + (f", and {total - SHOWN} more" if total > SHOWN else "")


def positive_array(values: object, name: str, source: str = "<table>") -> np.ndarray:
    """A 1-D float array with every value finite and > 0 (power laws live in log space).

    Bad entries are named by their 1-based position ("row 1" is the first value).
    """
    arr = np.asarray(values, dtype=float).reshape(-1)
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        rows = np.flatnonzero(bad)
        shown = [f"row {i + 1}: {plain(arr[i])}" for i in rows[:SHOWN]]
        raise FitError(f"{source}: column {name!r} has {len(rows)} non-positive or non-finite value(s) "
                       f"({_cells(shown, len(rows))}); power-law fits need values > 0 — drop those rows")
    return arr


def _row_label(df: pd.DataFrame, pos: int) -> str:
    lines = df.attrs.get("lines")
    where = f"data row {pos + 1}"
    return f"{where} (line {lines[pos]} of the file)" if lines is not None and len(lines) == len(df) else where


def numeric_column(df: pd.DataFrame, column: str, source: str = "<table>", *, positive: bool = True) -> np.ndarray:
    """The column as floats; any text, empty/NaN, infinite or (positive=True) non-positive cell is a FitError.

    The message names the file, the column, each bad cell's data row (1-based, below the header; with its line of
    the file when known) and its value as written, and the fix.
    """
    require_columns(df, [column], source)
    raw = df[column]
    if pd.api.types.is_bool_dtype(raw):  # a column of True/False is not a column of numbers
        text = np.ones(len(raw), dtype=bool)
        values = pd.Series(np.nan, index=raw.index)
    else:
        values = pd.to_numeric(raw, errors="coerce")
        text = (values.isna() & raw.notna()).to_numpy()
    arr = values.to_numpy(dtype=float)
    empty = ~text & np.isnan(arr)
    infinite = np.isinf(arr)
    nonpos = positive & np.isfinite(arr) & (arr <= 0)
    bad = text | empty | infinite | nonpos
    if not bad.any():
        return arr
    kinds = {"non-numeric": text, "empty or NaN": empty, "infinite": infinite, "non-positive": nonpos}
    present = [k for k, m in kinds.items() if m.any()]
    rows = np.flatnonzero(bad)
    shown = []
    for i in rows[:SHOWN]:
        kind = next(k for k, m in kinds.items() if m[i])
        cell = f"{_row_label(df, int(i))} is {plain(raw.iloc[i])}"
        shown.append(cell if len(present) == 1 else f"{cell} ({kind})")
    what = present[0] if len(present) == 1 else "unusable"
    if present == ["non-positive"]:
        fix = "the fit takes logs, so values must be > 0: correct the value or delete the row"
    else:
        fix = "write a number there" + (" (> 0: the fit takes logs)" if positive else "") + " or delete the row"
    raise FitError(f"{source}: column {column!r} has {len(rows)} {what} value{'s' if len(rows) > 1 else ''}: "
                   f"{_cells(shown, len(rows))}; {fix}")


def filled_column(df: pd.DataFrame, column: str, source: str = "<table>") -> np.ndarray:
    """The column's values (any type); an empty cell is a FitError naming its rows. Labels such as run ids."""
    require_columns(df, [column], source)
    empty = df[column].isna().to_numpy()
    if empty.any():
        rows = np.flatnonzero(empty)
        shown = [_row_label(df, int(i)) for i in rows[:SHOWN]]
        raise FitError(f"{source}: column {column!r} has {len(rows)} empty cell{'s' if len(rows) > 1 else ''}: "
                       f"{_cells(shown, len(rows))}; fill in a label (runs sharing one are resampled together) or "
                       "delete the row")
    return df[column].astype(str).to_numpy()


def require_points(n_distinct: int, need: int, what: str, source: str = "<table>", *, n_rows: int | None = None,
                   fix: str = "add rows at other values") -> None:
    if n_distinct < need:
        rows = f" in {n_rows} row(s)" if n_rows is not None else ""
        raise NotEnoughPointsError(f"{source}: not enough points for {what}: {n_distinct} distinct x value(s){rows}, "
                                   f"need at least {need}; {fix}")
