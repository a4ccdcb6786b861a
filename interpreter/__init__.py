"""vmcell host side: images, microVMs, sessions, kernel link and server."""

__version__ = "0.1.0"
