"""Host side of the guest link (and, on top of it, the Jupyter kernel client)."""

from .link import GuestLink

__all__ = ["GuestLink"]
