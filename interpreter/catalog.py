"""Which build of each template a process serves: resolved once, then pinned for the life of the process.

A template's build directory is keyed by a hash of its sources (guest code, recipes, wheel lock, spec,
accelerator, VMM). Hashing on every session create would block the IO loop, and a `git pull` under a
running server would change the key and make every new session fail. So a TemplateCatalog:

- resolves a name the first time it is asked for, hashing in a worker thread, and from then on answers
  from a dict: the same build for the life of the catalog, whatever happens to the sources;
- looks a name that was not built at its first lookup up again at the next one (a `vmcell template
  build` in another shell makes it available without a restart);
- holds a lease (shared flock, templates.Lease) on every build it serves, so that no build deletes it;
- can watch, in a background thread, whether the sources of what it serves changed since: it then logs
  once that a rebuild is pending, and status() (the server's /health) says so.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable

from . import templates as _templates
from .config import TEMPLATE_CHECK_EVERY_S
from .errors import TemplateMissing, VmcellError
from .templates import BuiltTemplate, Lease
from .vm.backend import VMBackend

log = logging.getLogger("vmcell.catalog")

# A name that was missing is looked at again by ready() (kernelspecs) only when its build directories
# changed, or after this long; get() (session create) always looks again.
MISSING_RECHECK_S = 30.0


@dataclass
class _Served:
    template: BuiltTemplate
    lease: Lease
    planned_key: str | None  # what today's sources would build, as of the last check; None if unknown
    problem: str | None = None  # why the last check could not compute planned_key
    reported: str | None = None  # the change last logged, to log each change once

    @property
    def rebuild_pending(self) -> bool:
        return self.planned_key != self.template.key


@dataclass
class _Missing:
    error: TemplateMissing
    builds: tuple[str, ...]  # the template's finished build directories when it was found missing
    at: float


def _finished_builds(name: str) -> tuple[str, ...]:
    return tuple(p.name for p in _templates.builds_of(name))


class TemplateCatalog:
    """Template name -> the BuiltTemplate this process restores sessions from."""

    def __init__(self, backend: VMBackend | None = None):
        if backend is None:
            from .vm.qemu import QemuBackend

            backend = QemuBackend()
        self.backend = backend
        self._served: dict[str, _Served] = {}
        self._missing: dict[str, _Missing] = {}
        self._resolving: dict[str, asyncio.Lock] = {}
        self._vmm_version: str | None = None
        self._guard = threading.Lock()  # _served, between the IO loop and the watcher thread
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._closed = False

    async def __aenter__(self) -> "TemplateCatalog":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- lookups ---------------------------------------------------------------------------------

    async def get(self, name: str) -> BuiltTemplate:
        """The build of `name` this process serves; resolved (hashing, in a thread) on the first call
        only. TemplateMissing, naming the fix, while it is not built."""
        served = self._served.get(name)
        if served is not None:
            return served.template
        if self._closed:
            raise VmcellError("the template catalog is closed")
        lock = self._resolving.setdefault(name, asyncio.Lock())
        async with lock:  # concurrent first lookups of one name resolve it once
            served = self._served.get(name)
            if served is not None:
                return served.template
            if self._vmm_version is None:
                self._vmm_version = await self.backend.version()
            try:
                served = await asyncio.to_thread(self._resolve, name, self._vmm_version)
            except TemplateMissing as exc:
                self._missing[name] = _Missing(exc, await asyncio.to_thread(_finished_builds, name), time.monotonic())
                raise
            if self._closed:  # closed while we resolved
                served.lease.release()
                raise VmcellError("the template catalog is closed")
            with self._guard:
                self._served[name] = served
            self._missing.pop(name, None)
            log.info("template %r: serving build %s", name, served.template.key)
            return served.template

    def _resolve(self, name: str, vmm_version: str) -> _Served:
        template = _templates.built_or_missing(name, self.backend, vmm_version)
        lease = Lease.take(template.directory)
        if lease is None:
            raise TemplateMissing(f"template {name!r} build {template.key} is being replaced or removed right now: "
                                  "try again once `vmcell template build` has finished")
        try:
            template.meta  # read once, here, off the IO loop: restores use its kernel key
        except (OSError, ValueError) as exc:
            lease.release()
            raise TemplateMissing(f"template {name!r} build {template.key} is unreadable ({exc}): "
                                  f"run `vmcell template build --force {name}`") from None
        return _Served(template, lease, planned_key=template.key)

    async def ready(self, names: Iterable[str]) -> dict[str, BuiltTemplate]:
        """The built templates among `names` (for listings such as kernelspecs). Served names cost a
        dict lookup; a name found missing before is looked up again only once its build directories
        changed (a build finished) or MISSING_RECHECK_S passed, so a listing does not hash per request."""
        found = {}
        for name in names:
            served = self._served.get(name)
            if served is not None:
                found[name] = served.template
                continue
            missing = self._missing.get(name)
            if missing is not None and time.monotonic() - missing.at < MISSING_RECHECK_S \
                    and await asyncio.to_thread(_finished_builds, name) == missing.builds:
                continue
            try:
                found[name] = await self.get(name)
            except VmcellError:
                continue  # not built (or its spec is invalid): not listed
        return found

    async def preload(self, names: Iterable[str]) -> dict[str, BuiltTemplate]:
        """Resolves (and leases) every built template among `names` now: a server pins what it serves at start."""
        return await self.ready(names)

    def served(self) -> dict[str, BuiltTemplate]:
        return {name: s.template for name, s in self._served.items()}

    def status(self) -> dict[str, dict]:
        """{name: {key, rebuild_pending, planned_key}} for every template this process serves."""
        return {name: {"key": s.template.key, "rebuild_pending": s.rebuild_pending, "planned_key": s.planned_key}
                for name, s in list(self._served.items())}

    # ---- have the sources changed? -----------------------------------------------------------------

    def check_sources(self) -> dict[str, bool]:
        """Recomputes the planned key of every served template (hashes: run it off the IO loop) and
        logs, once per change, those whose sources changed. Returns {name: rebuild_pending}."""
        with self._guard:
            served = list(self._served.items())
        for name, entry in served:
            try:
                planned = _templates.plan_template(_templates.load_template(name), self.backend,
                                                   self._vmm_version or "").key
                entry.planned_key, entry.problem = planned, None
            except (VmcellError, OSError, ValueError) as exc:
                planned, entry.planned_key, entry.problem = f"unknown: {exc}", None, str(exc)
            key = entry.template.key
            if planned == key:
                if entry.reported is not None:
                    log.info("template %r sources match the served build %s again", name, key)
                entry.reported = None
            elif planned != entry.reported:
                entry.reported = planned
                if entry.problem is None:
                    log.warning("template %r sources changed since this server started; serving build %s until "
                                "restart; run vmcell template build %s, then restart", name, key, name)
                else:
                    log.warning("template %r: its spec cannot be read any more (%s); serving build %s until restart",
                                name, entry.problem, key)
        return {name: entry.rebuild_pending for name, entry in served}

    async def check_now(self) -> dict[str, bool]:
        return await asyncio.to_thread(self.check_sources)

    def start_watching(self, every_s: float = TEMPLATE_CHECK_EVERY_S) -> None:
        """Checks the sources now, then every `every_s` seconds, in a daemon thread, until close()."""
        if self._watcher is not None:
            return
        self._stop.clear()
        self._watcher = threading.Thread(target=self._watch, args=(every_s,), name="vmcell-template-watch",
                                         daemon=True)
        self._watcher.start()

    def _watch(self, every_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.check_sources()
            except Exception:  # never let the watcher die quietly
                log.exception("checking template sources failed")
            if self._stop.wait(every_s):
                return

    # ---- end ---------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stops the watcher and releases every lease: a later build may delete what was served."""
        self._closed = True
        self._stop.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await asyncio.to_thread(watcher.join)
        with self._guard:
            served, self._served = list(self._served.values()), {}
        for entry in served:
            entry.lease.release()
