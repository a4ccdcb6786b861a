"""Confinement of each VM's QEMU: a jail (uid, mount namespace, no capabilities), cgroups, and the
sealed RAM images jailed QEMUs map. jailer.py is where to start reading; docs/architecture.md
section "Containment" gives the picture."""

from .enter import enter as enter_jail
from .jailer import Confinement, Jailer, Launch

__all__ = ["Confinement", "Jailer", "Launch", "enter_jail"]
