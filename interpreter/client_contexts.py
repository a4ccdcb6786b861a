"""Code contexts in the SDK (E2B's names): Sandbox and AsyncSandbox take these methods.

    ctx = sandbox.create_code_context(language="bash", cwd="/tmp")   # -> Context(id, language, cwd)
    sandbox.run_code("echo $PWD", context=ctx)                       # or language="bash": its default context
    sandbox.list_code_contexts(); sandbox.restart_code_context(ctx); sandbox.remove_code_context(ctx)

A context is its own kernel in the sandbox's VM: its own variables and cwd, the same files
(docs/architecture.md, "Code contexts"). Passing both `language` and `context` to run_code is a
ValueError before any request (as E2B's SDK does; the server answers 400 too).
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True)
class Context:
    """A code context: `id` names it in run_code(context=...) and the other calls."""

    id: str
    language: str
    cwd: str

    @classmethod
    def from_json(cls, data: dict) -> "Context":
        return cls(id=data["id"], language=data["language"], cwd=data["cwd"])


def context_id(context: "Context | str") -> str:
    if isinstance(context, Context):
        return context.id
    if isinstance(context, str) and context:
        return context
    raise TypeError(f"a code context is a Context or its id, got {context!r}")


def cell_context(language: str | None, context: "Context | str | None") -> dict:
    """run_code's `language` / `context` as request fields."""
    if language is not None and context is not None:
        raise ValueError("You can provide context or language, but not both at the same time.")
    if context is not None:
        return {"context": context_id(context)}
    return {"language": language} if language is not None else {}


def _create_body(language: str | None, cwd: str | None) -> dict:
    return {k: v for k, v in (("language", language), ("cwd", cwd)) if v is not None}


class CodeContexts:
    """Sandbox's code-context methods (`self._http`, `self._path` are the Sandbox's)."""

    def _context_path(self, context: "Context | str", action: str = "") -> str:
        path = self._path("contexts") + "/" + urllib.parse.quote(context_id(context), safe="")
        return path + (f"/{action}" if action else "")

    def create_code_context(self, language: str | None = None, cwd: str | None = None) -> Context:
        """A new kernel in this sandbox (`language`: the template's kernels, python by default)."""
        return Context.from_json(json.loads(self._http.call("POST", self._path("contexts"),
                                                            _create_body(language, cwd))))

    def list_code_contexts(self) -> list[Context]:
        """Every context of the sandbox, its default (the sandbox's own kernel, id "default") first."""
        return [Context.from_json(c) for c in json.loads(self._http.call("GET", self._path("contexts")))["contexts"]]

    def restart_code_context(self, context: "Context | str") -> None:
        """A fresh kernel for the context (its variables are lost; files stay)."""
        self._http.call("POST", self._context_path(context, "restart"))

    def remove_code_context(self, context: "Context | str") -> None:
        self._http.call("DELETE", self._context_path(context))

    def interrupt_code_context(self, context: "Context | str") -> None:
        """Interrupts the context's running cell (escalating as the sandbox's interrupt does)."""
        self._http.call("POST", self._context_path(context, "interrupt"))


class AsyncCodeContexts(CodeContexts):
    """AsyncSandbox's: the same calls, awaited."""

    async def create_code_context(self, language: str | None = None, cwd: str | None = None) -> Context:
        return Context.from_json(json.loads(await self._http.call("POST", self._path("contexts"),
                                                                  _create_body(language, cwd))))

    async def list_code_contexts(self) -> list[Context]:
        data = json.loads(await self._http.call("GET", self._path("contexts")))
        return [Context.from_json(c) for c in data["contexts"]]

    async def restart_code_context(self, context: "Context | str") -> None:
        await self._http.call("POST", self._context_path(context, "restart"))

    async def remove_code_context(self, context: "Context | str") -> None:
        await self._http.call("DELETE", self._context_path(context))

    async def interrupt_code_context(self, context: "Context | str") -> None:
        await self._http.call("POST", self._context_path(context, "interrupt"))
