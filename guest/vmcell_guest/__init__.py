"""vmcell guest side: PID 1 init and the link agent. Stdlib only; runs on the guest's Python 3.11."""

__version__ = "0.1.0"
