"""Which host files a jailed QEMU needs: its binary, the libraries it and its TCG module load, its
firmware; and a VM's images, including every file a qcow2 overlay's backing chain names."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from functools import lru_cache
from pathlib import Path

from ..errors import HostSetupError

# What QEMU loads at run time beyond its ELF dependencies (seen with strace on Debian's QEMU 7.2):
# the TCG accelerator is a module, and microvm boots through this firmware.
_MODULES = ("accel-tcg-x86_64.so",)
_FIRMWARE = ("bios-microvm.bin", "linuxboot_dma.bin")
_LDD_PATH = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")
_QCOW2_MAGIC = b"QFI\xfb"
_MAX_BACKING_DEPTH = 16


def _ldd(binary: Path) -> set[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise HostSetupError(f"ldd {binary} failed: {out.stderr.strip()}")
    return {Path(m.group(1)) for m in _LDD_PATH.finditer(out.stdout)}


@lru_cache(maxsize=4)
def qemu_runtime_files(qemu: Path) -> tuple[Path, ...]:
    """The binary, its libraries (ldd's closure, at the paths the loader uses), the TCG module and
    its libraries, the firmware, the loader's cache. Blocking (runs ldd): call it off the IO loop."""
    qemu = Path(shutil.which(str(qemu)) or qemu)
    files = {qemu, *_ldd(qemu)}
    # Debian's QEMU finds modules and firmware relative to its binary (/usr/bin/../lib/...).
    prefix = qemu.resolve().parent.parent
    for name in _MODULES:
        for module in prefix.glob(f"lib/*/qemu/{name}"):
            files |= {module, *_ldd(module)}
    for name in _FIRMWARE:
        firmware = prefix / "share" / "qemu" / name
        if firmware.exists():
            files.add(firmware)
    for optional in (Path("/etc/ld.so.cache"), Path("/etc/localtime")):
        if optional.exists():
            files.add(optional)
    return tuple(sorted(files))


def qcow2_backing(path: Path) -> Path | None:
    """The backing file a qcow2 image names (relative names resolve against the image's directory)."""
    with open(path, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
            return None
        offset, size = struct.unpack(">QI", header[8:20])
        if offset == 0 or not 0 < size <= 1023:
            return None
        f.seek(offset)
        name = f.read(size).decode("utf-8", "replace")
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def backing_chain(path: Path) -> list[Path]:
    """Every file below a disk image (for a raw image: none)."""
    chain: list[Path] = []
    current = path
    while (backing := qcow2_backing(current)) is not None:
        if backing in chain or len(chain) >= _MAX_BACKING_DEPTH:
            raise HostSetupError(f"the backing chain of {path} loops or is too deep")
        chain.append(backing)
        current = backing
    return chain
