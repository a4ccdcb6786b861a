"""More file operations for the host (E2B's `sandbox.files`): exists, remove, make_dir, rename.

Paths are resolved exactly as the agent's other file ops resolve them (agent._guest_path:
relative to /root, normalised). Each answers as E2B's SDK does: `exists` a bool, `make_dir`
whether it created the directory (False: it was there already), `rename` the entry it moved.
"""

from __future__ import annotations

import os
import shutil

from .ops import ErrorKind, OpError


def _path(args: dict, name: str = "path") -> str:
    from .agent import _guest_path

    return _guest_path({"path": args.get(name)})


def entry(path: str) -> dict:
    st = os.lstat(path)
    kind = "dir" if os.path.isdir(path) and not os.path.islink(path) else "file" if os.path.isfile(path) else "other"
    return {"name": os.path.basename(path), "path": path, "type": kind, "size": st.st_size}


def op_files_exists(args: dict) -> dict:
    path = _path(args)
    return {"path": path, "exists": os.path.lexists(path)}


def op_files_remove(args: dict) -> dict:
    path = _path(args)
    if path == "/":
        raise OpError(ErrorKind.PermissionDenied, "the root directory cannot be removed")
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return {"path": path}


def op_files_make_dir(args: dict) -> dict:
    path = _path(args)
    if os.path.isdir(path):
        return {"path": path, "created": False}
    os.makedirs(path)
    return {"path": path, "created": True}


def op_files_rename(args: dict) -> dict:
    old, new = _path(args), _path(args, "new_path")
    if not os.path.lexists(old):
        raise FileNotFoundError(2, "No such file or directory", old)
    os.makedirs(os.path.dirname(new) or "/", exist_ok=True)
    os.rename(old, new)
    return entry(new)



def _ops() -> dict:
    from .ops import Op

    return {Op.files_exists: op_files_exists, Op.files_remove: op_files_remove, Op.files_make_dir: op_files_make_dir,
            Op.files_rename: op_files_rename}


OPS = _ops()
