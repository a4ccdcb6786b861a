"""HTTP server: the REST API for tool loops, the Jupyter kernel-gateway API, MCP (/mcp) and /metrics."""

from .app import close_app, make_app, serve

__all__ = ["close_app", "make_app", "serve"]
