"""IPython extension loaded into the guest kernel: per-cell settings that travel as message data.

The host puts `{"vmcell": {...}}` in an execute_request's metadata. Before the cell runs we apply
it, after the cell we undo what was per-cell. Values are never spliced into code: an env value with
quotes and newlines arrives byte for byte.

  env: {name: value|null}   set (or unset, for null) for this cell only
  session_env: {...}        the same, kept after the cell (session-wide variables)
  reseed: true              reseed `random` and numpy's global RNG from the (fresh) kernel entropy
  output_cap: bytes         stdout/stderr kept per cell; the rest is dropped here, in the guest

The host enforces its own cap on whatever arrives (the guest is untrusted); the guest-side cap
keeps a runaway print from buffering hundreds of MiB into one message inside a 1 GiB VM.
"""

from __future__ import annotations

import os
import random
import sys

_MISSING = object()
_saved: dict[str, object] = {}
# Past the host's cap by this much, so the host sees the overflow and marks the result truncated.
_CAP_MARGIN = 64 * 1024
_FLUSH_EVERY = 1024 * 1024  # keeps each stream message small


class _StreamBudget:
    def __init__(self) -> None:
        self.cap: int | None = None
        self.used = 0
        self.unflushed = 0

    def wrap(self, stream) -> None:
        write = stream.write

        def capped_write(text):
            if not isinstance(text, str) or self.cap is None:
                return write(text)
            room = self.cap + _CAP_MARGIN - self.used
            if room <= 0:
                return len(text)
            piece = text[:room]
            self.used += len(piece)
            self.unflushed += len(piece)
            write(piece)
            if self.unflushed >= _FLUSH_EVERY:
                self.unflushed = 0
                stream.flush()
            return len(text)

        stream.write = capped_write


_budget = _StreamBudget()


def _request_settings(ip) -> dict:
    kernel = getattr(ip, "kernel", None)
    if kernel is None:
        return {}
    try:
        parent = kernel.get_parent("shell")
    except TypeError:  # older ipykernel
        parent = kernel.get_parent()
    settings = (parent or {}).get("metadata", {}).get("vmcell")
    return settings if isinstance(settings, dict) else {}


def _apply(env: dict, remember: bool) -> None:
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            continue
        if remember and name not in _saved:
            _saved[name] = os.environ.get(name, _MISSING)
        if value is None:
            os.environ.pop(name, None)
        elif isinstance(value, str) and "\0" not in value:
            os.environ[name] = value


def reseed() -> None:
    random.seed(os.urandom(32))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))


def load_ipython_extension(ip) -> None:
    # pre/post_execute, not pre/post_run_cell: those skip silent cells, and the host's setup cells are silent.
    def pre_execute() -> None:
        settings = _request_settings(ip)
        cap = settings.get("output_cap")
        _budget.cap = cap if isinstance(cap, int) and cap > 0 else None
        _budget.used = _budget.unflushed = 0
        if not settings:
            return
        if isinstance(settings.get("session_env"), dict):
            _apply(settings["session_env"], remember=False)
        if isinstance(settings.get("env"), dict):
            _apply(settings["env"], remember=True)
        if settings.get("reseed"):
            reseed()

    def post_execute() -> None:
        while _saved:
            name, old = _saved.popitem()
            if old is _MISSING:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

    for stream in (sys.stdout, sys.stderr):
        _budget.wrap(stream)
    ip.events.register("pre_execute", pre_execute)
    ip.events.register("post_execute", post_execute)
