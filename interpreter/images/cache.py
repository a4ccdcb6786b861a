"""Content-keyed artifact cache under $VMCELL_HOME: keys, locks, atomic outputs, build commands."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ..config import HOST_TOOL_PACKAGES, vmcell_home
from ..errors import HostSetupError, ImageBuildError

KEY_LENGTH = 16


def digest(*items: object) -> str:
    """A short stable key over strings, bytes, files and directory trees (paths and contents)."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, Path):
            paths = sorted(p for p in item.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
                if item.is_dir() else [item]
            for p in paths:
                h.update(str(p.relative_to(item.parent)).encode() + b"\0" + p.read_bytes() + b"\0")
        elif isinstance(item, bytes):
            h.update(item + b"\0")
        else:
            h.update(repr(item).encode() + b"\0")
    return h.hexdigest()[:KEY_LENGTH]


@contextmanager
def build_lock(name: str) -> Iterator[None]:
    """Serialises builds of one artifact across processes (CI and a developer's shell, say)."""
    locks = vmcell_home() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@contextmanager
def atomic_output(final: Path) -> Iterator[Path]:
    """Yields a scratch path next to `final`; it becomes `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.with_name(f".{final.name}.partial-{os.getpid()}")
    remove(scratch)
    try:
        yield scratch
        if final.is_dir() and not final.is_symlink():
            # A directory cannot be replaced in one step: move the old one aside, so that `final` is
            # never seen half-deleted, then delete it.
            retired = final.with_name(f".{final.name}.retired-{os.getpid()}")
            remove(retired)
            os.replace(final, retired)
            os.replace(scratch, final)
            remove(retired)
        else:
            os.replace(scratch, final)
    finally:
        remove(scratch)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def require_tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pkg = HOST_TOOL_PACKAGES.get(name, name)
        raise HostSetupError(f"{name} is not installed: run `apt-get install {pkg}` (or `make setup`)")
    return found


def run(cmd: Sequence[str | os.PathLike], what: str, cwd: Path | None = None, env: dict | None = None) -> str:
    """Runs a build command; a failure raises ImageBuildError with the tail of its output."""
    require_tool(str(cmd[0]))
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return proc.stdout
