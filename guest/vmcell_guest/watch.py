"""Directory watches (E2B's `sandbox.files.watch_dir`), in the guest: inotify, events streamed.

`files_watch` {id, path, recursive} starts a watch and answers at once; every change below the
directory follows as a `files_event` {id, name (relative to the watched directory), type} event,
with E2B's types: create, write, remove, rename, chmod. `files_unwatch` {id} ends it (the host
does when its client stops listening). At most MAX_WATCHES at once, at most MAX_DIRS directories
per recursive watch; an inotify queue overflow is sent as one `overflow` event. Paths resolve as
the other file ops' (agent._guest_path).
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import threading
from typing import Callable

from .ops import ErrorKind, Event, OpError
from .wire import encode_control

MAX_WATCHES = 16
MAX_DIRS = 1024
IN_MODIFY, IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x2, 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_Q_OVERFLOW, IN_IGNORED, IN_ISDIR = 0x100, 0x200, 0x400, 0x4000, 0x8000, 0x40000000
MASK = IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
TYPES = ((IN_CREATE | IN_MOVED_TO, "create"), (IN_MODIFY, "write"), (IN_DELETE, "remove"),
         (IN_MOVED_FROM, "rename"), (IN_ATTRIB, "chmod"))
_HEADER = struct.Struct("iIII")


class _Watch:
    def __init__(self, watch_id: str, root: str, recursive: bool):
        self.id, self.root, self.recursive = watch_id, root, recursive
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.dirs: dict[int, str] = {}  # watch descriptor -> path relative to root ("" for root)
        self.stopped = threading.Event()

    def add(self, relative: str) -> None:
        if len(self.dirs) >= MAX_DIRS:
            return
        wd = self.libc.inotify_add_watch(self.fd, os.path.join(self.root, relative).encode(), MASK)
        if wd >= 0:
            self.dirs[wd] = relative
            if self.recursive:
                try:
                    with os.scandir(os.path.join(self.root, relative)) as it:
                        for entry in it:
                            if entry.is_dir(follow_symlinks=False):
                                self.add(os.path.join(relative, entry.name))
                except OSError:
                    pass
        elif not relative:
            raise OSError(ctypes.get_errno(), f"cannot watch {self.root}")


class Watches:
    def __init__(self, write: Callable[[bytes], None]):
        self._write = write
        self._lock = threading.Lock()
        self._watches: dict[str, _Watch] = {}

    def start(self, args: dict) -> dict:
        from .agent import _guest_path

        watch_id = args.get("id")
        if not isinstance(watch_id, str) or not 1 <= len(watch_id) <= 64 or not watch_id.isalnum():
            raise OpError(ErrorKind.BadRequest, "id must be 1..64 letters or digits")
        root = _guest_path(args)
        recursive = args.get("recursive", False)
        if not isinstance(recursive, bool):
            raise OpError(ErrorKind.BadRequest, "recursive must be a boolean")
        if not os.path.isdir(root):
            raise OpError(ErrorKind.NotFound if not os.path.exists(root) else ErrorKind.NotADirectory,
                          f"not a directory: {root}")
        with self._lock:
            if len(self._watches) >= MAX_WATCHES or watch_id in self._watches:
                raise OpError(ErrorKind.TooLarge, f"at most {MAX_WATCHES} watches at once, each id once")
            watch = _Watch(watch_id, root, recursive)
            try:
                watch.add("")
            except OSError:
                os.close(watch.fd)
                raise
            self._watches[watch_id] = watch
        threading.Thread(target=self._run, args=(watch,), name=f"watch-{watch_id}", daemon=True).start()
        return {"id": watch_id, "path": root}

    def stop(self, args: dict) -> dict:
        with self._lock:
            watch = self._watches.pop(args.get("id"), None) if isinstance(args.get("id"), str) else None
        if watch is None:
            return {"stopped": False}
        watch.stopped.set()
        return {"stopped": True}

    def _event(self, watch: _Watch, name: str, kind: str) -> None:
        self._write(encode_control({"event": Event.files_event, "id": watch.id, "name": name, "type": kind}))

    def _run(self, watch: _Watch) -> None:
        try:
            while not watch.stopped.is_set():
                ready, _, _ = select.select([watch.fd], [], [], 0.2)
                if not ready:
                    continue
                try:
                    data = os.read(watch.fd, 64 * 1024)
                except BlockingIOError:
                    continue
                offset = 0
                while offset + _HEADER.size <= len(data):
                    wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
                    raw = data[offset + _HEADER.size: offset + _HEADER.size + length]
                    offset += _HEADER.size + length
                    self._handle(watch, wd, mask, raw.rstrip(b"\0").decode(errors="replace"))
        finally:
            os.close(watch.fd)
            with self._lock:
                self._watches.pop(watch.id, None)

    def _handle(self, watch: _Watch, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self._event(watch, "", "overflow")
            return
        if mask & IN_IGNORED:
            watch.dirs.pop(wd, None)
            return
        parent = watch.dirs.get(wd)
        if parent is None or not name:
            return
        relative = os.path.join(parent, name)
        if watch.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            watch.add(relative)
        for bit, kind in TYPES:
            if mask & bit:
                self._event(watch, relative, kind)
                break
