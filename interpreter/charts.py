"""Typed charts for the SDK, named and shaped as E2B Code Interpreter's (`e2b_code_interpreter.charts`).

`Result.chart` is one of these, built from the chart the server sends (which the server checked,
interpreter/kernel/charts.py). `to_dict()` gives that JSON back.

    chart = sandbox.run_code(plot_code).results[0].chart
    if isinstance(chart, LineChart):
        for series in chart.elements:
            print(series.label, series.points[:3])
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Union


class ChartType(str, enum.Enum):
    LINE = "line"
    SCATTER = "scatter"
    BAR = "bar"
    PIE = "pie"
    BOX_AND_WHISKER = "box_and_whisker"
    SUPERCHART = "superchart"
    UNKNOWN = "unknown"


class ScaleType(str, enum.Enum):
    LINEAR = "linear"
    DATETIME = "datetime"
    CATEGORICAL = "categorical"
    LOG = "log"
    SYMLOG = "symlog"
    LOGIT = "logit"
    FUNCTION = "function"
    FUNCTIONLOG = "functionlog"
    ASINH = "asinh"
    UNKNOWN = "unknown"


def _scale(value) -> ScaleType:
    try:
        return ScaleType(value)
    except ValueError:
        return ScaleType.UNKNOWN


@dataclass
class Chart:
    """Any chart: its type, title and elements (none for an unknown one)."""

    type: ChartType
    title: str | None = None
    elements: list[Any] = field(default_factory=list)
    _raw_data: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        return self._raw_data


@dataclass
class Chart2D(Chart):
    x_label: str | None = None
    y_label: str | None = None
    x_unit: str | None = None
    y_unit: str | None = None


@dataclass
class PointData:
    label: str
    points: list[tuple[Union[str, float, None], Union[str, float, None]]]


@dataclass
class PointChart(Chart2D):
    x_ticks: list[Union[str, float, None]] = field(default_factory=list)
    x_tick_labels: list[str] = field(default_factory=list)
    x_scale: ScaleType = ScaleType.LINEAR
    y_ticks: list[Union[str, float, None]] = field(default_factory=list)
    y_tick_labels: list[str] = field(default_factory=list)
    y_scale: ScaleType = ScaleType.LINEAR
    elements: list[PointData] = field(default_factory=list)


@dataclass
class LineChart(PointChart):
    pass


@dataclass
class ScatterChart(PointChart):
    pass


@dataclass
class BarData:
    label: str
    group: str
    value: float | None


@dataclass
class BarChart(Chart2D):
    elements: list[BarData] = field(default_factory=list)


@dataclass
class PieData:
    label: str
    angle: float
    radius: float


@dataclass
class PieChart(Chart):
    elements: list[PieData] = field(default_factory=list)


@dataclass
class BoxAndWhiskerData:
    label: str
    min: float
    first_quartile: float
    median: float
    third_quartile: float
    max: float
    outliers: list[float] = field(default_factory=list)


@dataclass
class BoxAndWhiskerChart(Chart2D):
    elements: list[BoxAndWhiskerData] = field(default_factory=list)


@dataclass
class SuperChart(Chart):
    elements: list[Chart] = field(default_factory=list)


ChartTypes = Union[LineChart, ScatterChart, BarChart, PieChart, BoxAndWhiskerChart, SuperChart, Chart]
_LABELS = ("x_label", "y_label", "x_unit", "y_unit")


def deserialize_chart(data: dict | None) -> ChartTypes | None:
    """A typed chart from the server's JSON (None for none). Unknown types become a plain Chart."""
    if not data:
        return None
    try:
        kind = ChartType(data.get("type"))
    except ValueError:
        kind = ChartType.UNKNOWN
    common = {"type": kind, "title": data.get("title"), "_raw_data": data}
    labels = {name: data.get(name) for name in _LABELS}
    elements = data.get("elements") or []
    if kind in (ChartType.LINE, ChartType.SCATTER):
        cls = LineChart if kind == ChartType.LINE else ScatterChart
        axes = {}
        for axis in ("x", "y"):
            axes[f"{axis}_ticks"] = list(data.get(f"{axis}_ticks") or [])
            axes[f"{axis}_tick_labels"] = list(data.get(f"{axis}_tick_labels") or [])
            axes[f"{axis}_scale"] = _scale(data.get(f"{axis}_scale"))
        series = [PointData(e.get("label", ""), [(p[0], p[1]) for p in e.get("points") or []]) for e in elements]
        return cls(**common, **labels, **axes, elements=series)
    if kind == ChartType.BAR:
        return BarChart(**common, **labels, elements=[BarData(e.get("label", ""), e.get("group", ""), e.get("value"))
                                                      for e in elements])
    if kind == ChartType.PIE:
        return PieChart(**common, elements=[PieData(e.get("label", ""), e.get("angle"), e.get("radius"))
                                            for e in elements])
    if kind == ChartType.BOX_AND_WHISKER:
        boxes = [BoxAndWhiskerData(e.get("label", ""), e.get("min"), e.get("first_quartile"), e.get("median"),
                                   e.get("third_quartile"), e.get("max"), list(e.get("outliers") or []))
                 for e in elements]
        return BoxAndWhiskerChart(**common, **labels, elements=boxes)
    if kind == ChartType.SUPERCHART:
        return SuperChart(**common, elements=[c for c in map(deserialize_chart, elements) if c is not None])
    return Chart(**common, elements=[])


_deserialize_chart = deserialize_chart  # E2B's name
