"""IPython extension loaded into the guest kernel: per-cell settings that travel as message data.

The host puts `{"vmcell": {...}}` in an execute_request's metadata. Before the cell runs we apply
it, after the cell we undo what was per-cell. Values are never spliced into code: an env value with
quotes and newlines arrives byte for byte.

  env: {name: value|null}   set (or unset, for null) for this cell only
  session_env: {...}        the same, kept after the cell (session-wide variables)
  reseed: true              reseed `random` and numpy's global RNG from the (fresh) kernel entropy
"""

from __future__ import annotations

import os
import random
import sys

_MISSING = object()
_saved: dict[str, object] = {}


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

    ip.events.register("pre_execute", pre_execute)
    ip.events.register("post_execute", post_execute)
