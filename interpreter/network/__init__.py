"""Network for sessions that ask for it: egress through the host's allow-list proxy, never a NIC.

  policy.py   the allow list (parse, match, internal addresses), redaction for the API
  proxy.py    the asyncio HTTP/1.1 forward proxy (CONNECT and absolute-form), one per session
  egress.py   the host end of the VM's egress port: the guest's connections as streams

`attach(session)` (re)connects a session's egress whenever its VM comes (back) to life: created,
taken from the pool, forked, restored from disk, adopted by a restarted server. docs/network.md
describes the whole path.
"""

from __future__ import annotations

import asyncio

from ..errors import VMStartError
from .egress import PROXY_ENV, EgressEndpoint
from .policy import InvalidNetwork, NetworkPolicy

__all__ = ["NetworkPolicy", "InvalidNetwork", "EgressEndpoint", "PROXY_ENV", "attach", "detach"]


async def attach(session) -> None:
    """Connects the session's egress to its (running) VM and gives its kernel the proxy variables;
    a no-op for a session without network."""
    if session.network is None or session.vm is None:
        return
    await detach(session)
    metrics = getattr(session, "metrics", None)
    endpoint = EgressEndpoint(session.id, session.network, on_refuse=metrics.egress_refused if metrics else None)
    try:
        await endpoint.connect(session.vm.egress_path, session.kernel.agent)
    except (OSError, asyncio.TimeoutError) as exc:
        raise VMStartError(f"session {session.id}: its VM's egress port could not be connected ({exc!r})") from None
    session.egress = endpoint
    # As the session env reaches the warm kernel: with its next cell (and every restart's env).
    session.kernel.lifecycle.env.update(PROXY_ENV)
    pending = session.engine.pending_settings
    pending["session_env"] = {**pending.get("session_env", {}), **PROXY_ENV}


async def detach(session) -> None:
    endpoint, session.egress = session.egress, None
    if endpoint is not None:
        await endpoint.close()
