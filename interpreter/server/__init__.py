"""HTTP server: the REST API for tool loops and the Jupyter kernel-gateway API."""

from .app import make_app, serve

__all__ = ["make_app", "serve"]
