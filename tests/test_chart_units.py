"""The host's check of guest charts and DataFrame data against hostile input, and the SDK's E2B-shaped
models (typed charts, quote-stripped text, to_json). Pure logic: no VM."""

import json
import math

import pytest

from interpreter.charts import BarChart, Chart, ChartType, LineChart, ScaleType, SuperChart, deserialize_chart
from interpreter.kernel.charts import CHART_MIME, DATA_MIME, MAX_POINTS, MAX_TOTAL_POINTS, check_chart, check_data
from interpreter.kernel.results import Result as ServerResult
from interpreter.models import Execution, ExecutionError, Logs, Result

LINE = {"type": "line", "title": "t", "x_label": "Time (s)", "y_label": None, "x_unit": "s", "y_unit": None,
        "x_ticks": [0.0, 1.0], "x_tick_labels": ["0", "1"], "x_scale": "linear",
        "y_ticks": [], "y_tick_labels": [], "y_scale": "log",
        "elements": [{"label": "a", "points": [[0, 1.5], ["2024-01-01", None]]}]}


def test_a_good_chart_is_rebuilt_with_its_values():
    checked = check_chart(LINE)
    assert checked == {**LINE, "elements": [{"label": "a", "points": [[0.0, 1.5], ["2024-01-01", None]]}]}
    assert checked is not LINE


@pytest.mark.parametrize("hostile", [
    None, [], "line", 7,
    {"type": "radar", "elements": []},  # unknown type
    {**LINE, "title": 5},
    {**LINE, "title": "x" * 100_000},
    {**LINE, "x_ticks": "0,1"},
    {**LINE, "x_ticks": [0.0] * 100_000},
    {**LINE, "elements": [{"label": "a", "points": [[1, 2, 3]]}]},
    {**LINE, "elements": [{"label": "a", "points": [[{"$x": 1}, 2]]}]},
    {**LINE, "elements": [{"label": "a", "points": [[math.inf, 2]]}]},
    {**LINE, "elements": [{"label": "a", "points": [[True, 2]]}]},
    {**LINE, "elements": [{"label": ["a"], "points": []}]},
    {**LINE, "elements": [{"label": "a", "points": [[0, 0]] * (MAX_POINTS + 1)}]},
    {**LINE, "elements": [{"label": str(i), "points": [[0, 0]] * MAX_POINTS} for i in range(MAX_TOTAL_POINTS // MAX_POINTS + 1)]},
    {**LINE, "elements": "many"},
    {**LINE, "elements": [7]},
    {"type": "bar", "elements": [{"label": "a", "group": "g", "value": "100"}]},
    {"type": "pie", "elements": [{"label": "a", "angle": float("nan"), "radius": 1}]},
    {"type": "box_and_whisker", "elements": [{"label": "a", "min": 1, "first_quartile": 2, "median": 3,
                                              "third_quartile": 4, "max": None, "outliers": []}]},
    {"type": "superchart", "elements": [{"type": "superchart", "elements": []}]},  # nested superchart
    {"type": "superchart", "elements": [{"type": "line", "elements": [{"label": 1, "points": []}]}]},
])
def test_hostile_charts_are_dropped(hostile):
    assert check_chart(hostile) is None


def test_unknown_keys_and_scales_do_not_pass_through():
    checked = check_chart({**LINE, "x_scale": "<script>", "__proto__": {"x": 1}, "extra": "x" * 10})
    assert checked["x_scale"] == "unknown" and "__proto__" not in checked and "extra" not in checked
    assert check_chart({"type": "unknown", "title": None, "elements": [{"anything": 1}]}) == \
        {"type": "unknown", "title": None, "elements": []}


def test_a_deeply_nested_value_is_refused_without_recursing_into_it():
    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert check_chart({**LINE, "elements": [{"label": "a", "points": [[deep, 1]]}]}) is None


@pytest.mark.parametrize("hostile", [
    [1, 2], {"a": "not a list"}, {"a": [[1]]}, {"a": [{"b": 1}]}, {"a": [float("inf")] * 0 + [object()]},
    {"a": ["x" * 20_000]}, {str(i): [0] for i in range(10_001)}, {"a": [0] * 100_001},
])
def test_hostile_data_is_dropped(hostile):
    assert check_data(hostile) is None


def test_data_keeps_scalars_and_blanks_non_finite_numbers():
    assert check_data({"a": [1, 2.5, None, True, "x", float("nan")]}) == {"a": [1, 2.5, None, True, "x", None]}


def test_the_server_result_takes_checked_fields_only():
    bundle = {"text/plain": "<Figure>", "image/png": "iVBOR", CHART_MIME: LINE, DATA_MIME: {"a": [1]},
              "application/x-other": "kept"}
    result = ServerResult.from_bundle(bundle, is_main_result=False)
    assert result.chart["type"] == "line" and result.data == {"a": [1]} and result.extra == {"application/x-other": "kept"}
    assert result.formats() == ["text", "png", "data", "chart", "application/x-other"]
    hostile = ServerResult.from_bundle({"text/plain": "x", CHART_MIME: {"type": "line", "elements": "x"}}, False)
    assert hostile.chart is None and CHART_MIME not in hostile.extra and "chart" not in hostile.to_dict()


def test_sdk_charts_are_typed():
    chart = deserialize_chart(check_chart(LINE))
    assert isinstance(chart, LineChart) and chart.type == ChartType.LINE and chart.y_scale == ScaleType.LOG
    assert chart.elements[0].points == [(0.0, 1.5), ("2024-01-01", None)] and chart.x_unit == "s"
    assert chart.to_dict()["title"] == "t"
    bar = deserialize_chart({"type": "bar", "title": None, "elements": [{"label": "a", "group": "g", "value": 2.0}]})
    assert isinstance(bar, BarChart) and bar.elements[0].value == 2.0 and bar.x_label is None
    sup = deserialize_chart({"type": "superchart", "title": "s", "elements": [LINE, {"type": "unknown"}]})
    assert isinstance(sup, SuperChart) and isinstance(sup.elements[0], LineChart) and type(sup.elements[1]) is Chart
    assert deserialize_chart({"type": "from-the-future", "elements": []}).type == ChartType.UNKNOWN
    assert deserialize_chart(None) is None


def test_sdk_result_as_e2b():
    result = Result.from_dict({"text": "'hello'", "png": "iVBOR", "chart": LINE, "is_main_result": True,
                               "extra": {"application/x": 1}})
    assert result.text == "hello" and result.text_plain == "'hello'" and result["png"] == "iVBOR"
    assert result.formats() == ["text", "png", "chart", "application/x"] and isinstance(result.chart, LineChart)
    assert Result(text='"it\'s"').text == '"it\'s"' and Result(text="'").text == "'"
    assert repr(Result(png="x")) == "Result(Formats: png)" and repr(result) == "Result(hello)"
    execution = Execution(results=[result], logs=Logs(["a\n"], []),
                          error=ExecutionError.from_dict({"name": "E", "value": "v", "traceback": ["l1", "l2"]}))
    assert execution.text == "hello" and execution.error.traceback == "l1\nl2"
    data = json.loads(execution.to_json())
    assert data["results"][0]["chart"]["type"] == "line" and data["results"][0]["text"] == "hello"
    assert json.loads(data["logs"]) == {"stdout": ["a\n"], "stderr": []}
    assert json.loads(data["error"]) == {"name": "E", "value": "v", "traceback": "l1\nl2"}
