"""The host's check of what the guest says a result's chart and data are (the guest is untrusted).

The guest's kernel puts a chart (vmcell_guest/charts.py) and a DataFrame's columns
(vmcell_guest/display.py) in display bundles under vmcell MIME types. Before either becomes a
Result's `chart` or `data`, it is rebuilt here field by field from a strict schema: known chart
types and keys only, every value of its type (numbers finite, strings and lists within caps), at
most MAX_DEPTH of nesting (a superchart of plain charts), the whole within MAX_CHART_BYTES. What
fails is dropped (the result keeps its PNG and text) and logged; nothing of it is passed on as is.
"""

from __future__ import annotations

import logging
import math

from vmcell_guest.charts import CHART_MIME, DATA_MIME  # noqa: F401 (re-exported for results.py)

log = logging.getLogger("vmcell.charts")

CHART_TYPES = ("line", "scatter", "bar", "pie", "box_and_whisker", "superchart", "unknown")
SCALES = ("linear", "datetime", "categorical", "log", "symlog", "logit", "function", "functionlog", "asinh", "unknown")
MAX_ELEMENTS = 1_000
MAX_POINTS = 10_000  # per series
MAX_TOTAL_POINTS = 200_000  # per chart
MAX_TICKS = 1_000
MAX_TEXT = 1_000
MAX_DATA_COLUMNS = 10_000
MAX_DATA_CELLS = 100_000
MAX_DATA_TEXT = 10_000  # characters per cell


class Invalid(ValueError):
    """A chart or data the guest sent does not fit the schema."""


def _text(value, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise Invalid(f"expected a string of at most {limit} characters, got {type(value).__name__}")
    return value


def _opt_text(value) -> str | None:
    return None if value is None else _text(value)


def _number(value, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Invalid(f"expected a finite number, got {value!r:.40}")
    return float(value)


def _list(value, limit: int) -> list:
    if not isinstance(value, list) or len(value) > limit:
        raise Invalid(f"expected a list of at most {limit} items")
    return value


def _coordinate(value):
    return _text(value) if isinstance(value, str) else _number(value, optional=True)


class _Budget:
    def __init__(self) -> None:
        self.points = 0

    def take(self, n: int) -> None:
        self.points += n
        if self.points > MAX_TOTAL_POINTS:
            raise Invalid(f"more than {MAX_TOTAL_POINTS} points in one chart")


def _chart(raw, budget: _Budget, depth: int) -> dict:
    if not isinstance(raw, dict):
        raise Invalid("a chart must be an object")
    kind = raw.get("type")
    if kind not in CHART_TYPES:
        raise Invalid(f"unknown chart type {kind!r:.40}")
    chart = {"type": kind, "title": _opt_text(raw.get("title"))}
    elements = _list(raw.get("elements", []), MAX_ELEMENTS)
    if kind in ("line", "scatter", "bar", "box_and_whisker"):
        for name in ("x_label", "y_label", "x_unit", "y_unit"):
            chart[name] = _opt_text(raw.get(name))
    if kind in ("line", "scatter"):
        for axis in ("x", "y"):
            scale = raw.get(f"{axis}_scale", "linear")
            chart[f"{axis}_scale"] = scale if scale in SCALES else "unknown"
            chart[f"{axis}_ticks"] = [_coordinate(t) for t in _list(raw.get(f"{axis}_ticks", []), MAX_TICKS)]
            chart[f"{axis}_tick_labels"] = [_text(t) for t in _list(raw.get(f"{axis}_tick_labels", []), MAX_TICKS)]
        chart["elements"] = [_series(e, budget) for e in elements]
    elif kind == "bar":
        chart["elements"] = [{"label": _text(e.get("label")), "group": _text(e.get("group")),
                              "value": _number(e.get("value"), optional=True)} for e in map(_object, elements)]
    elif kind == "pie":
        chart["elements"] = [{"label": _text(e.get("label")), "angle": _number(e.get("angle")),
                              "radius": _number(e.get("radius"))} for e in map(_object, elements)]
    elif kind == "box_and_whisker":
        chart["elements"] = [_box(e, budget) for e in map(_object, elements)]
    elif kind == "superchart":
        if depth > 0:
            raise Invalid("a superchart cannot hold another superchart")
        chart["elements"] = [_chart(e, budget, depth + 1) for e in elements]
    else:
        chart["elements"] = []
    return chart


def _object(value) -> dict:
    if not isinstance(value, dict):
        raise Invalid("a chart element must be an object")
    return value


def _series(raw, budget: _Budget) -> dict:
    raw = _object(raw)
    points = _list(raw.get("points"), MAX_POINTS)
    budget.take(len(points))
    checked = []
    for point in points:
        if not isinstance(point, list) or len(point) != 2:
            raise Invalid("a point must be [x, y]")
        checked.append([_coordinate(point[0]), _coordinate(point[1])])
    return {"label": _text(raw.get("label")), "points": checked}


def _box(raw: dict, budget: _Budget) -> dict:
    outliers = _list(raw.get("outliers", []), MAX_POINTS)
    budget.take(len(outliers))
    box = {"label": _text(raw.get("label"))}
    for name in ("min", "first_quartile", "median", "third_quartile", "max"):
        box[name] = _number(raw.get(name))
    box["outliers"] = [_number(o) for o in outliers]
    return box


def check_chart(raw) -> dict | None:
    """The chart rebuilt from what the guest sent, or None (logged) if it does not fit."""
    try:
        return _chart(raw, _Budget(), 0)
    except (Invalid, RecursionError) as exc:
        log.warning("dropped a chart the guest sent: %s", exc)
        return None


def _cell(value):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return _text(value, MAX_DATA_TEXT)
    raise Invalid(f"a data cell must be a scalar, got {type(value).__name__}")


def check_data(raw) -> dict | None:
    """A DataFrame's columns {name: [scalars]} rebuilt from what the guest sent, or None (logged)."""
    try:
        if not isinstance(raw, dict) or len(raw) > MAX_DATA_COLUMNS:
            raise Invalid(f"data must be an object of at most {MAX_DATA_COLUMNS} columns")
        cells, data = 0, {}
        for name, values in raw.items():
            values = _list(values, MAX_DATA_CELLS)
            cells += len(values)
            if cells > MAX_DATA_CELLS:
                raise Invalid(f"more than {MAX_DATA_CELLS} cells")
            data[_text(name)] = [_cell(v) for v in values]
        return data
    except Invalid as exc:
        log.warning("dropped DataFrame data the guest sent: %s", exc)
        return None
