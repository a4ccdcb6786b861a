"""How a server's sessions live: the warm pool, auto-pause, save-to-disk, and where the registry is.

One place for the knobs `vmcell serve` exposes (--pool, --auto-pause, --save-after, --state-dir);
the manager and its helpers (pool.py, idle.py, registry.py) read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_AUTO_PAUSE_S


@dataclass(frozen=True)
class LifecycleSettings:
    # Template name -> sessions kept restored, paused and ready (`--pool 4` means the default template).
    pool: dict[str, int] = field(default_factory=dict)
    # Seconds without activity before a session's VM is stopped (no CPU); None: never.
    auto_pause_s: float | None = DEFAULT_AUTO_PAUSE_S
    # Seconds a session stays paused in memory before it is saved to disk and its RAM freed; None: never.
    save_after_s: float | None = None
    # Where the registry (SQLite) and the sessions' VMs, saved states and fork snapshots live. None:
    # sessions are ephemeral (they die with the manager, as for `vmcell run` and most tests).
    state_dir: Path | None = None
