"""Structured cell results, shaped like E2B Code Interpreter's (the reference tool loops know).

Execution{results: [Result], logs: {stdout, stderr}, error, execution_count} plus what we add:
duration, truncated. Streaming events are the same data, one piece at a time.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .charts import CHART_MIME, DATA_MIME, check_chart, check_data

# MIME type -> Result field. Everything else is kept verbatim in `extra`.
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
}
# vmcell's own MIME types (the guest's display.py), checked before they become fields (charts.py).
CHECKED_FIELDS = {DATA_MIME: ("data", check_data), CHART_MIME: ("chart", check_chart)}

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass
class Result:
    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None  # base64, as Jupyter sends it
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    data: dict | None = None  # a DataFrame's columns {name: [values]} (E2B's `data`)
    chart: dict | None = None  # a matplotlib figure's chart (E2B's `chart`; the SDK types it)
    extra: dict[str, Any] = field(default_factory=dict)
    is_main_result: bool = False

    @classmethod
    def from_bundle(cls, bundle: dict, is_main_result: bool) -> "Result":
        result = cls(is_main_result=is_main_result)
        for mime, value in bundle.items():
            name = MIME_FIELDS.get(mime)
            if mime in CHECKED_FIELDS:
                name, check = CHECKED_FIELDS[mime]
                result.__dict__[name] = check(value)
            elif name is None:
                result.extra[mime] = value
            elif name == "json":
                result.json = value
            else:
                result.__dict__[name] = value if isinstance(value, str) else "".join(map(str, value)) \
                    if isinstance(value, list) else str(value)
        return result

    @classmethod
    def from_dict(cls, data: dict) -> "Result":
        known = {*MIME_FIELDS.values(), "data", "chart"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra=dict(data.get("extra") or {}), is_main_result=bool(data.get("is_main_result")))

    def formats(self) -> list[str]:
        names = [n for n in (*MIME_FIELDS.values(), "data", "chart") if getattr(self, n) is not None]
        return names + list(self.extra)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if v is not None and k not in ("extra", "is_main_result")}
        if self.extra:
            data["extra"] = self.extra
        data["is_main_result"] = self.is_main_result
        return data


@dataclass
class Logs:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class ExecutionError:
    name: str
    value: str
    traceback: list[str] = field(default_factory=list)
    # True when the cell did not end by itself: its kernel died (KernelDied), its session is gone
    # (VMDied, SessionClosed) or the guest broke the protocol (GuestProtocolError). The SDK raises these.
    fault: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> "ExecutionError":
        return cls(str(data.get("name", "")), str(data.get("value", "")), list(data.get("traceback") or []),
                   data.get("fault") is True)

    @classmethod
    def from_exception(cls, exc: BaseException) -> "ExecutionError":
        return cls(type(exc).__name__, str(exc), [], fault=True)


@dataclass
class ExecutionResult:
    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    duration_ms: float = 0.0  # host-timed, request sent to last message in
    guest_ms: float | None = None  # inside the guest: kernel busy -> idle, by the guest's clock
    truncated: bool = False

    @property
    def text(self) -> str | None:
        """The main result's text, as E2B's Execution.text."""
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    def to_dict(self) -> dict:
        return {
            "results": [r.to_dict() for r in self.results],
            "logs": asdict(self.logs),
            "error": asdict(self.error) if self.error else None,
            "execution_count": self.execution_count,
            "duration_ms": round(self.duration_ms, 2),
            "guest_ms": round(self.guest_ms, 2) if self.guest_ms is not None else None,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class OutputEvent:
    """One streaming event: type is stdout, stderr, result, error, execution_count or end."""

    type: str
    data: Any = None

    def to_dict(self) -> dict:
        if self.type in ("stdout", "stderr"):
            return {"type": self.type, "text": self.data}
        if self.type == "result":
            return {"type": "result", **self.data.to_dict()}
        if self.type == "error":
            return {"type": "error", **asdict(self.data)}
        if self.type == "execution_count":
            return {"type": "execution_count", "execution_count": self.data}
        return {"type": self.type, **(self.data or {})}
