"""What the SDK returns for a cell, shaped as E2B Code Interpreter's models (`e2b_code_interpreter.models`).

The server's JSON (interpreter/kernel/results.py) carries Jupyter's MIME bundle verbatim; these
classes give it E2B's face: `Result.text` of a string result without its quotes, `Result.chart` a
typed chart (charts.py), `Result.data` a DataFrame's columns, `formats()` and `result["png"]`,
`traceback` one string, `to_json()` on Execution, Logs and ExecutionError. vmcell's additions
(`Execution.duration_ms`, `truncated`; `ExecutionError.fault`) stay out of to_json().
"""

from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from typing import Any, Iterable

from .charts import Chart, deserialize_chart

# Result fields in E2B's order (formats(), to_json()).
FORMATS = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript", "data", "chart")


class Result:
    """One output of a cell: its last expression (`is_main_result`) or a display call (a plot...)."""

    def __init__(self, text: str | None = None, html: str | None = None, markdown: str | None = None,
                 svg: str | None = None, png: str | None = None, jpeg: str | None = None, pdf: str | None = None,
                 latex: str | None = None, json: Any = None, javascript: str | None = None,
                 data: dict | None = None, chart: dict | Chart | None = None, is_main_result: bool = False,
                 extra: dict | None = None, **kwargs):
        # E2B gives a string result's text without its quotes ('a' -> a); `text_plain` keeps Jupyter's.
        self.text_plain = text
        self.text = text[1:-1] if isinstance(text, str) and len(text) >= 2 and text[0] == text[-1] == "'" else text
        self.html, self.markdown, self.svg, self.png, self.jpeg = html, markdown, svg, png, jpeg
        self.pdf, self.latex, self.json, self.javascript, self.data = pdf, latex, json, javascript, data
        self.chart = chart if isinstance(chart, Chart) or chart is None else deserialize_chart(chart)
        self.is_main_result = is_main_result
        self.extra = extra or {}

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        """From one result of the server's JSON (an execute answer, or a `result` stream line)."""
        known = {k: data[k] for k in FORMATS if k in data}
        return cls(**known, is_main_result=bool(data.get("is_main_result")), extra=dict(data.get("extra") or {}))

    def __getitem__(self, item: str):
        return getattr(self, item)

    def formats(self) -> Iterable[str]:
        return [name for name in FORMATS if getattr(self, name)] + list(self.extra)

    def to_dict(self) -> dict:
        data = {name: self.chart.to_dict() if name == "chart" else self[name] for name in self.formats()
                if name in FORMATS}
        if self.extra:
            data["extra"] = self.extra
        data["text"] = self.text
        return data

    def __repr__(self) -> str:
        return f"Result({self.text})" if self.text else "Result(Formats: " + ", ".join(self.formats()) + ")"

    __str__ = __repr__

    def _repr_html_(self):
        return self.html

    def _repr_markdown_(self):
        return self.markdown

    def _repr_svg_(self):
        return self.svg

    def _repr_png_(self):
        return self.png

    def _repr_jpeg_(self):
        return self.jpeg

    def _repr_pdf_(self):
        return self.pdf

    def _repr_latex_(self):
        return self.latex

    def _repr_json_(self):
        return self.json

    def _repr_javascript_(self):
        return self.javascript


@dataclass(repr=False)
class Logs:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Logs(stdout: {self.stdout}, stderr: {self.stderr})"

    def to_json(self) -> str:
        return _json.dumps({"stdout": self.stdout, "stderr": self.stderr})


@dataclass
class ExecutionError:
    name: str
    value: str
    traceback: str = ""  # one string, as E2B's (the server's list of lines, joined)
    # True when the cell did not end by itself (its kernel died, its session is gone): run_code raises those.
    fault: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> "ExecutionError":
        traceback = data.get("traceback") or ""
        if isinstance(traceback, list):
            traceback = "\n".join(str(line) for line in traceback)
        return cls(str(data.get("name", "")), str(data.get("value", "")), str(traceback), data.get("fault") is True)

    def to_json(self) -> str:
        return _json.dumps({"name": self.name, "value": self.value, "traceback": self.traceback})


@dataclass(repr=False)
class Execution:
    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    duration_ms: float = 0.0  # vmcell: host-timed
    truncated: bool = False  # vmcell: output past the server's cap was dropped

    def __repr__(self) -> str:
        return f"Execution(Results: {self.results}, Logs: {self.logs}, Error: {self.error})"

    @property
    def text(self) -> str | None:
        """The main result's text (the cell's last expression)."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    def to_json(self) -> str:
        """As E2B's: results with their formats, and logs and error as JSON strings."""
        return _json.dumps({
            "results": [result.to_dict() for result in self.results],
            "logs": self.logs.to_json(),
            "error": self.error.to_json() if self.error else None,
        })
