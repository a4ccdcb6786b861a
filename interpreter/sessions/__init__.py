"""Sessions: one microVM each, restored from a warm template snapshot."""

from .manager import SessionManager
from .session import Identity, RunResult, Session

__all__ = ["SessionManager", "Session", "Identity", "RunResult"]
