"""The host side of the guest link, in layers (as jupyter_client's session / client / manager):

  link.py       frames over the VM's socket; control requests and replies
  agent.py      AgentClient: one typed method per guest agent operation
  router.py     MessageRouter: signs and verifies Jupyter messages, delivers them to subscribers
  lifecycle.py  KernelLifecycle: start, restart, death (auto-restart), callbacks
  engine.py     CellEngine: every cell from every door: turn, settings, cap, timeout, stop, end
  results.py    ExecutionResult and friends (E2B's shapes)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .agent import AgentClient, SlotAgent
from .engine import CellEngine
from .lifecycle import KernelLifecycle
from .link import GuestLink
from .router import MessageRouter

__all__ = ["GuestLink", "AgentClient", "MessageRouter", "KernelLifecycle", "CellEngine", "Kernel"]

@dataclass(frozen=True)
class Kernel:
    """The layers over one guest link, wired once."""

    agent: AgentClient
    router: MessageRouter
    lifecycle: KernelLifecycle
    engine: CellEngine

    @classmethod
    def attach(cls, agent: AgentClient, key: bytes, env: dict[str, str] | None = None, preload: tuple[str, ...] = (),
               on_activity: Callable[[], None] | None = None, slot: int = 0, language: str | None = None,
               cwd: str | None = None) -> "Kernel":
        """The default kernel (slot 0), or a code context's (slot 1.., its language and cwd)."""
        router = MessageRouter(agent.link, key, slot)
        bound = SlotAgent(agent, slot, language, cwd)  # its kernel ops and events only
        lifecycle = KernelLifecycle(bound, router, key, env, preload)
        return cls(agent, router, lifecycle, CellEngine(router, lifecycle, bound, on_activity=on_activity))
