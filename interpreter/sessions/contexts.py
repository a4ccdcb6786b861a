"""Code contexts (E2B's `create_code_context`): more kernels in one session's VM, sharing its files.

Each context is its own Jupyter kernel in the same guest, forked from the template's warm fork
server: its own variables, its own cwd, its own language (`python`, `bash`: the template's
`kernels` list), its own cgroup (limits, kill_children), the same files. On the link it is a slot
(docs/link-protocol.md, "Code contexts"); on the host a `Kernel` (router, lifecycle, cell engine)
like the session's own, which is the default context (`id` "default", slot 0).

A context lives in the VM's memory: pause, resume, save and load keep it; a fork's children get
the parent's contexts (same ids) from the capture; a restarted server re-attaches them from the
session's registry row (`records`). E2B's `language` alone means that language's default context:
the session's kernel for python, for another language a context made on first use and kept.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmcell_guest.wire import MAX_CONTEXT_SLOT

from ..config import MAX_CONTEXTS
from ..errors import ContextLimitReached, ContextNotFound, InvalidRequest, VmcellError
from ..kernel import Kernel

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("vmcell.sessions")

DEFAULT_CONTEXT_ID = "default"
DEFAULT_LANGUAGE = "python"
DEFAULT_CWD = "/root"
MAX_CWD_CHARS = 4096
assert MAX_CONTEXTS <= MAX_CONTEXT_SLOT


@dataclass(eq=False)
class CodeContext:
    id: str
    slot: int  # 0: the session's own kernel
    language: str
    cwd: str
    kernel: Kernel
    default_for: str | None = None  # made by `language` alone: that language's default context

    def public(self) -> dict:
        """E2B's Context: {id, language, cwd}."""
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    def record(self, gateway: bool = False) -> dict:
        return {"id": self.id, "slot": self.slot, "language": self.language, "cwd": self.cwd,
                "default_for": self.default_for, **({"gateway": True} if gateway else {})}

    @property
    def engine(self):
        return self.kernel.engine


def parse_records(records) -> list[dict]:
    """Context records of a registry row or a parent (ValueError for one this version cannot read)."""
    if not isinstance(records, list):
        raise ValueError("contexts is not a list")
    out, slots = [], set()
    for r in records:
        if not (isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("language"), str)
                and isinstance(r.get("cwd"), str) and isinstance(r.get("slot"), int)
                and 1 <= r["slot"] <= MAX_CONTEXT_SLOT and r["slot"] not in slots
                and isinstance(r.get("default_for"), (str, type(None)))
                and isinstance(r.get("gateway", False), bool)):
            raise ValueError(f"bad context record {r!r}")
        slots.add(r["slot"])
        out.append(r)
    return out


class SessionContexts:
    """The code contexts of one session (not the default: that is the session's kernel)."""

    def __init__(self, session: "Session"):
        self.session = session
        self._contexts: dict[str, CodeContext] = {}
        self._lock = asyncio.Lock()  # creations and removals take turns (slots, language defaults)
        self._making: dict[str, asyncio.Future] = {}  # language -> its default context being made
        # The kernel the Jupyter gateway's clients talk to (a gateway kernel started with the `bash`
        # kernelspec: bash's default context); None: the session's own kernel.
        self.gateway: CodeContext | None = None

    # ---- what exists ------------------------------------------------------------------------

    @property
    def languages(self) -> tuple[str, ...]:
        return self.session.template.spec.kernels

    def default(self) -> CodeContext:
        return CodeContext(DEFAULT_CONTEXT_ID, 0, DEFAULT_LANGUAGE, DEFAULT_CWD, self.session.kernel)

    def all(self) -> list[CodeContext]:
        return [self.default(), *sorted(self._contexts.values(), key=lambda c: c.slot)]

    def extra(self) -> list[CodeContext]:
        return list(self._contexts.values())

    def get(self, context_id) -> CodeContext:
        if not isinstance(context_id, str):
            raise InvalidRequest(f"a context is named by its id (a string), got {context_id!r}")
        if context_id == DEFAULT_CONTEXT_ID:
            return self.default()
        context = self._contexts.get(context_id)
        if context is None:
            raise ContextNotFound(f"session {self.session.id} has no code context {context_id!r}")
        return context

    def records(self) -> list[dict]:
        return [c.record(c is self.gateway) for c in sorted(self._contexts.values(), key=lambda c: c.slot)]

    # ---- make, resolve, remove ----------------------------------------------------------------

    def check_language(self, language) -> str:
        if language is None:
            return DEFAULT_LANGUAGE
        if not isinstance(language, str) or language not in self.languages:
            raise InvalidRequest(f"language {language!r} is not available in template "
                                 f"{self.session.template.spec.name!r} (its kernels: {', '.join(self.languages)})")
        return language

    @staticmethod
    def check_cwd(cwd) -> str:
        if cwd is None:
            return DEFAULT_CWD
        if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd or len(cwd) > MAX_CWD_CHARS:
            raise InvalidRequest(f"cwd must be an absolute path (at most {MAX_CWD_CHARS} characters), got {cwd!r}")
        return cwd

    async def create(self, language=None, cwd=None, default_for: str | None = None) -> CodeContext:
        """A new kernel in the session's VM, ready when this returns (the session must be running)."""
        language, cwd = self.check_language(language), self.check_cwd(cwd)
        async with self._lock:
            self.session.check()
            if len(self._contexts) >= MAX_CONTEXTS:
                raise ContextLimitReached(f"session {self.session.id} has {len(self._contexts)} code contexts "
                                          f"besides its default (the limit is {MAX_CONTEXTS}); remove one first")
            used = {c.slot for c in self._contexts.values()}
            slot = next(s for s in range(1, MAX_CONTEXT_SLOT + 1) if s not in used)
            context = self._attach(str(uuid.uuid4()), slot, language, cwd, default_for)
            try:
                await context.kernel.lifecycle.start()
            except BaseException:
                self._detach(context)
                try:  # whatever the guest started for it
                    await self.session.kernel.agent.kernel_stop(slot)
                except (VmcellError, asyncio.CancelledError):
                    pass
                raise
            self._contexts[context.id] = context
        self.session.context_changed()
        log.info("session %s: code context %s (%s, slot %d, cwd %s)", self.session.id, context.id, language,
                 slot, cwd)
        return context

    def _attach(self, context_id: str, slot: int, language: str, cwd: str, default_for: str | None) -> CodeContext:
        session = self.session
        preload = session.template.spec.preload if language == "python" else ()
        kernel = Kernel.attach(session.kernel.agent, session.template.kernel_key, session.env, preload,
                               on_activity=session.touch, slot=slot, language=language, cwd=cwd)
        return CodeContext(context_id, slot, language, cwd, kernel, default_for)

    @staticmethod
    def _detach(context: CodeContext, fault: BaseException | None = None) -> None:
        kernel = context.kernel
        kernel.engine.fail(fault or ContextNotFound(f"code context {context.id} was removed"))
        kernel.lifecycle.close()
        kernel.lifecycle.agent.close()  # its SlotAgent: no more events
        kernel.router.detach()

    def resolve(self, language=None, context=None) -> CodeContext | None:
        """Which context a cell runs in, without creating one: None means `language`'s default
        context, which does not exist yet (`for_cell` makes it). Both given: 400 (E2B's rule)."""
        if language is not None and context is not None:
            raise InvalidRequest("give a cell either `context` or `language`, not both")
        if context is not None:
            return self.get(context)
        language = self.check_language(language)
        if language == DEFAULT_LANGUAGE:
            return self.default()
        return next((c for c in self._contexts.values() if c.default_for == language), None)

    async def for_cell(self, language=None, context=None) -> CodeContext:
        found = self.resolve(language, context)
        if found is not None:
            return found
        # `language`'s default context, made on first use (two first cells at once make one)
        making = self._making.get(language)
        if making is None:
            making = self._making[language] = asyncio.ensure_future(self.create(language, default_for=language))
            making.add_done_callback(lambda _: self._making.pop(language, None))
        return await asyncio.shield(making)

    async def remove(self, context_id) -> None:
        context = self.get(context_id)
        if context.slot == 0:
            raise InvalidRequest("the default context is the session's own kernel: it cannot be removed "
                                 "(restart it, or close the session)")
        if context is self.gateway:
            raise InvalidRequest(f"context {context.id} is the kernel of this session's Jupyter gateway clients: "
                                 "it cannot be removed (shut the gateway kernel down instead)")
        async with self._lock:
            if self._contexts.pop(context.id, None) is None:
                raise ContextNotFound(f"session {self.session.id} has no code context {context.id!r}")
            self._detach(context)
            self.session.context_changed()
            try:
                await self.session.kernel.agent.kernel_stop(context.slot)
            except VmcellError as exc:  # the host has let go of it either way
                log.warning("session %s: stopping context %s in the guest failed: %s", self.session.id,
                            context.id, exc)

    async def restart(self, context_id) -> CodeContext:
        context = self.get(context_id)
        await context.kernel.lifecycle.restart()
        return context

    # ---- the session's life ---------------------------------------------------------------------

    def adopt_records(self, records: list[dict]) -> None:
        """The contexts of a fork's parent or of a registry row: their kernels are in the VM's memory
        already; only the host's side is made (before the link's handshake: their output may come at once)."""
        for r in parse_records(records):
            context = self._attach(r["id"], r["slot"], r["language"], r["cwd"], r.get("default_for"))
            self._contexts[context.id] = context
            if r.get("gateway"):
                self._bind_gateway(context)

    # ---- the Jupyter gateway's kernel (server/gateway.py) ------------------------------------------

    async def bind_gateway(self, language: str) -> CodeContext:
        """A gateway kernel of another language than python: its clients talk to that language's
        default context (made now), not to the session's own kernel."""
        context = await self.for_cell(language=language)
        self._bind_gateway(context)
        self.session.context_changed()
        return context

    def _bind_gateway(self, context: CodeContext) -> None:
        from .channels import ClientChannels

        self.gateway = context
        self.session.channels = ClientChannels(context.kernel.router)

    def gateway_kernel(self) -> Kernel:
        return (self.gateway or self.default()).kernel

    def after_restore(self, session_env: dict[str, str]) -> None:
        for context in self._contexts.values():
            context.engine.after_restore(session_env)

    def fail(self, fault: BaseException) -> None:
        for context in self._contexts.values():
            context.engine.fail(fault)
            context.kernel.lifecycle.close()

    @property
    def busy(self) -> bool:
        return any(c.engine.busy for c in self._contexts.values())
