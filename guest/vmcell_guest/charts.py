"""Chart extraction, in the guest kernel: a matplotlib Figure -> a JSON chart (E2B's chart shapes).

The kernel's display formatter for CHART_MIME (display.py) calls `figure_to_chart` for every
Figure it displays (plt.show() through the inline backend, a Figure as a cell's last expression,
display(fig)), so the chart travels in the same display bundle as the PNG. The host validates it
(interpreter/kernel/charts.py: the guest is untrusted) and the SDK builds typed charts from it
(interpreter/charts.py).

Shapes (every key always present; numbers are floats, or null for NaN/inf):
  common      {type, title, elements}
  2-D         + x_label, y_label, x_unit, y_unit (a unit is what a label carries in "(...)" or "[...]")
  line/scatter + x_ticks, x_tick_labels, x_scale, y_ticks, y_tick_labels, y_scale;
                 elements [{label, points: [[x, y], ...]}] (x, y: number, or str for dates/categories)
  bar         elements [{label, group, value}]
  pie         elements [{label, angle (degrees), radius}]
  box_and_whisker  elements [{label, min, first_quartile, median, third_quartile, max, outliers}]
  superchart  a figure of several axes: elements [one chart per axes]
  unknown     an axes we cannot read: elements []

Scales: linear, datetime, categorical, log, symlog, logit, function, functionlog, asinh.
Only this module imports matplotlib, and only when a Figure is displayed (it is then loaded).
Stdlib at import time, so the host can import the constants.
"""

from __future__ import annotations

import math
import re

CHART_MIME = "application/vnd.vmcell.chart+json"
DATA_MIME = "application/vnd.vmcell.data+json"
MAX_POINTS = 10_000  # per series: a longer one is sampled evenly (first and last kept)
MAX_ELEMENTS = 1_000  # per chart (bars, wedges, boxes, series, sub-charts)
MAX_TEXT = 1_000  # characters per label or title
_UNIT = re.compile(r"\s\((.*?)\)|\[(.*?)\]")


def _text(value) -> str | None:
    text = str(value) if value is not None else ""
    return text[:MAX_TEXT] or None


def _number(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _coordinate(value):
    """A point's coordinate: a number, an ISO date for dates, a string for categories."""
    if isinstance(value, str):
        return value[:MAX_TEXT]
    isoformat = getattr(value, "isoformat", None)
    if isoformat is not None and not isinstance(value, (int, float)):
        return isoformat()
    if type(value).__name__ == "datetime64":
        return str(value.astype("datetime64[s]"))
    return _number(value)


def _sample(values: list, limit: int = MAX_POINTS) -> list:
    if len(values) <= limit:
        return values
    step = (len(values) - 1) / (limit - 1)
    return [values[round(i * step)] for i in range(limit)]


def _unit(label: str | None) -> str | None:
    match = _UNIT.search(label) if label else None
    return (match.group(1) or match.group(2)) if match else None


def _converter_kind(axis) -> str | None:
    get = getattr(axis, "get_converter", None)
    converter = get() if get is not None else getattr(axis, "converter", None)
    module = type(converter).__module__ if converter is not None else ""
    if module == "matplotlib.dates":
        return "datetime"
    if module == "matplotlib.category":
        return "categorical"
    return None


def _scale(ax, axis, name: str) -> str:
    kind = _converter_kind(axis)
    if kind is not None:
        return kind
    scale = getattr(ax, f"get_{name}scale")()
    return scale if isinstance(scale, str) else "linear"


def _tick_labels(axis) -> tuple[list[float], list[str]]:
    """The major ticks in view and their labels, from the locator and formatter: no Tick artists
    are made (axis.get_ticklabels() would create them, most of an extraction's time)."""
    low, high = sorted(axis.get_view_interval())
    slack = (high - low) * 1e-9
    locs = [float(t) for t in axis.get_majorticklocs() if low - slack <= t <= high + slack]
    try:
        labels = axis.get_major_formatter().format_ticks(locs)
    except Exception:  # a formatter that needs a drawn figure
        labels = [label.get_text() for label in axis.get_ticklabels()]
        locs = [float(t) for t in axis.get_ticklocs()][: len(labels)]
    return locs, [str(label) for label in labels]


def _ticks(axis, kind: str | None) -> tuple[list, list[str]]:
    ticks, labels = _tick_labels(axis)
    labels = [_text(label) or "" for label in labels]
    if kind == "datetime":
        from matplotlib import dates

        return [dates.num2date(t).isoformat() for t in ticks], labels
    return [_number(t) for t in ticks], labels


def _base(ax, kind: str) -> dict:
    return {"type": kind, "title": _text(ax.get_title()), "elements": []}


def _two_d(ax, kind: str, swap: bool = False) -> dict:
    chart = _base(ax, kind)
    x_label, y_label = _text(ax.get_xlabel()), _text(ax.get_ylabel())
    if swap:  # x is always the category axis of bars and boxes (E2B's convention)
        x_label, y_label = y_label, x_label
    chart.update(x_label=x_label, y_label=y_label, x_unit=_unit(x_label), y_unit=_unit(y_label))
    return chart


def _point_chart(ax, kind: str) -> dict:
    chart = _two_d(ax, kind)
    for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
        scale = _scale(ax, axis, name)
        ticks, labels = _ticks(axis, scale)
        chart.update({f"{name}_ticks": ticks, f"{name}_tick_labels": labels, f"{name}_scale": scale})
    return chart


def _line(ax) -> dict:
    chart = _point_chart(ax, "line")
    for n, line in enumerate(ax.get_lines()[:MAX_ELEMENTS]):
        label = str(line.get_label())
        if label.startswith("_"):
            label = f"Line {n}"
        xs, ys = line.get_xdata(orig=True), line.get_ydata(orig=True)
        points = [[_coordinate(x), _coordinate(y)] for x, y in zip(_sample(list(xs)), _sample(list(ys)))]
        chart["elements"].append({"label": _text(label) or "", "points": points})
    return chart


def _scatter(ax) -> dict:
    chart = _point_chart(ax, "scatter")
    dated = {name: _scale(ax, axis, name) == "datetime" for name, axis in (("x", ax.xaxis), ("y", ax.yaxis))}
    for n, collection in enumerate(ax.collections[:MAX_ELEMENTS]):
        label = str(collection.get_label())
        if label.startswith("_"):
            label = f"Series {n}"
        points = []
        for x, y in _sample([tuple(p) for p in collection.get_offsets()]):
            points.append([_date(x) if dated["x"] else _number(x), _date(y) if dated["y"] else _number(y)])
        chart["elements"].append({"label": _text(label) or "", "points": points})
    return chart


def _date(value) -> str | None:
    from matplotlib import dates

    number = _number(value)
    return None if number is None else dates.num2date(number).isoformat()


def _tick_label_at(axis, position: float) -> str:
    """The label of the tick at this position (a categorical or labelled axis), else the number."""
    for tick, label in zip(*_tick_labels(axis)):
        if abs(tick - position) < 1e-9 and label:
            return label
    return f"{position:g}"


def _bars(ax) -> dict:
    rects = [r for c in ax.containers for r in c if hasattr(r, "get_height")]
    # Vertical bars stand side by side (their x differ); horizontal ones (barh) are stacked in y.
    vertical = len({round(r.get_x(), 9) for r in rects}) >= len({round(r.get_y(), 9) for r in rects})
    chart = _two_d(ax, "bar", swap=not vertical)
    for n, container in enumerate(ax.containers):
        group = str(container.get_label())
        if group.startswith("_"):
            group = f"Group {n}"
        for rect in container:
            if len(chart["elements"]) >= MAX_ELEMENTS or not hasattr(rect, "get_height"):
                break
            if vertical:
                label, value = _tick_label_at(ax.xaxis, rect.get_x() + rect.get_width() / 2), rect.get_height()
            else:
                label, value = _tick_label_at(ax.yaxis, rect.get_y() + rect.get_height() / 2), rect.get_width()
            chart["elements"].append({"label": _text(label) or "", "group": _text(group) or "", "value": _number(value)})
    return chart


def _pie(ax) -> dict:
    chart = _base(ax, "pie")
    for wedge in ax.patches[:MAX_ELEMENTS]:
        chart["elements"].append({"label": _text(wedge.get_label()) or "",
                                  "angle": _number(abs(round(wedge.theta2 - wedge.theta1, 4))),
                                  "radius": _number(wedge.r)})
    return chart


def _boxes(ax) -> dict:
    from matplotlib.patches import PathPatch

    boxes = []
    for patch in ax.patches:
        if isinstance(patch, PathPatch):
            v = patch.get_path().vertices
            boxes.append((float(v[:, 0].min()), float(v[:, 0].max()), float(v[:, 1].min()), float(v[:, 1].max())))
    widths = {round(b[1] - b[0], 9) for b in boxes}
    heights = {round(b[3] - b[2], 9) for b in boxes}
    vertical = len(widths) <= len(heights)  # vertical boxes share a width; their extents in y differ
    chart = _two_d(ax, "box_and_whisker", swap=not vertical)
    lines = []
    for line in ax.get_lines():
        xs, ys = [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]
        across, along = (xs, ys) if vertical else (ys, xs)
        lines.append((across, along, line.get_linestyle() in ("None", "", " ", "none")))
    seen = set()
    for box in boxes[:MAX_ELEMENTS]:
        lo, hi, q1, q3 = box if vertical else (box[2], box[3], box[0], box[1])
        if (lo, hi, q1, q3) in seen:  # the same box drawn twice (e.g. boxplot() called again)
            continue
        seen.add((lo, hi, q1, q3))
        eps = 1e-9 * max(1.0, abs(hi - lo))
        low, high, median, outliers = q1, q3, None, []
        for across, along, markers_only in lines:
            if not across or not all(lo - eps <= a <= hi + eps for a in across):
                continue
            if markers_only:
                outliers.extend(along)
            elif len(along) == 2 and along[0] == along[1] and q1 <= along[0] <= q3:
                median = along[0]
            elif len(across) == 2 and across[0] == across[1]:  # a whisker
                low, high = min(low, *along), max(high, *along)
        center = (lo + hi) / 2
        label = _tick_label_at(ax.xaxis if vertical else ax.yaxis, center)
        chart["elements"].append({"label": _text(label) or "", "min": _number(low), "first_quartile": _number(q1),
                                  "median": _number(median if median is not None else (q1 + q3) / 2),
                                  "third_quartile": _number(q3), "max": _number(high),
                                  "outliers": [_number(o) for o in sorted(set(outliers))][:MAX_POINTS]})
    return chart


def _kind(ax) -> str:
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch, Rectangle, Wedge
    from matplotlib.text import Text

    artists = [*ax.lines, *ax.collections, *ax.patches, *ax.images, *ax.tables]
    artists = [a for a in artists if not isinstance(a, Text)]
    if not artists:
        return "unknown"
    if all(isinstance(a, Line2D) for a in artists):
        return "line"
    if any(isinstance(a, PathPatch) for a in artists) and all(isinstance(a, (PathPatch, Line2D)) for a in artists):
        return "box_and_whisker"
    if all(isinstance(a, PathCollection) for a in artists):
        return "scatter"
    if all(isinstance(a, Wedge) for a in artists):
        return "pie"
    if ax.containers and all(isinstance(a, Rectangle) for a in artists):
        return "bar"
    return "unknown"


_EXTRACT = {"line": _line, "scatter": _scatter, "bar": _bars, "pie": _pie, "box_and_whisker": _boxes}


def axes_to_chart(ax) -> dict:
    kind = _kind(ax)
    extract = _EXTRACT.get(kind)
    return extract(ax) if extract is not None else _base(ax, "unknown")


def figure_to_chart(figure) -> dict | None:
    """The figure's chart, or None for a figure without axes."""
    axes = [ax for ax in figure.get_axes() if ax.get_visible()]
    if not axes:
        return None
    if len(axes) == 1:
        return axes_to_chart(axes[0])
    suptitle = getattr(figure, "_suptitle", None)
    return {"type": "superchart", "title": _text(suptitle.get_text()) if suptitle is not None else None,
            "elements": [axes_to_chart(ax) for ax in axes[:MAX_ELEMENTS]]}
