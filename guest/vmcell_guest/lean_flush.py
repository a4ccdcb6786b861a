"""ipykernel's stream flush without the thread round trip when there is nothing to flush.

ipykernel (6.29) sends every IOPub message from its IOPub thread. `sys.stdout.flush()` on the
kernel's main thread schedules a flush on that thread and then a second event that it waits for:
two wake-ups of the IOPub thread and a wait, every time. ipykernel flushes stdout and stderr
before a cell's code runs, around the display hook and before the execute_reply: about six
flushes for `1+1`, most of them with nothing written and nothing queued. Under TCG every such
round trip costs milliseconds of guest CPU (docs/performance.md has the profile).

Here a flush on the main thread returns at once when it could not change anything: the stream has
nothing buffered and no event handed to the IOPub thread (a message to send, a flush) is queued or
running. Otherwise it does what ipykernel does, with one event instead of two (flush, then
signal). The guarantee a flush gives is kept: everything written or sent before it has reached
the IOPub socket when it returns. "Queued or running" is a counter kept under a lock by wrapping
the thread's `schedule` and the stream's own timed `_flush`; the check reads the buffers before
the counter, and a `_flush` counts itself before it takes the buffers, so a flush under way is
always seen.

Everything is patched on the instances (sys.stdout, sys.stderr, their IOPub thread), not on
ipykernel's classes; `uninstall()` puts the originals back.
"""

from __future__ import annotations

import os
import sys
import threading


class LeanFlush:
    def __init__(self, streams) -> None:
        self.streams = [s for s in streams if _patchable(s)]
        self.pub = self.streams[0].pub_thread if self.streams else None
        self._lock = threading.Lock()
        self._pending = 0  # events handed to the IOPub thread (and timed _flushes) not finished yet
        self._saved: list[tuple[object, str]] = []

    def install(self) -> bool:
        if self.pub is None or any(s.pub_thread is not self.pub for s in self.streams):
            return False
        real_schedule = self.pub.schedule

        def schedule(f):
            self._enter()
            try:
                real_schedule(lambda: self._run(f))
            except BaseException:
                self._leave()
                raise

        self._set(self.pub, "schedule", schedule)
        # A fork taken while the IOPub thread held the lock would leave it held in the child for good.
        os.register_at_fork(after_in_child=self._after_fork)
        for stream in self.streams:
            real_flush_now = stream._flush

            def flush_now(real=real_flush_now):
                self._enter()  # before the buffers are taken: a check that finds them empty sees this
                try:
                    real()
                finally:
                    self._leave()

            self._set(stream, "_flush", flush_now)
            self._set(stream, "flush", lambda stream=stream: self.flush(stream))
        return True

    def uninstall(self) -> None:
        while self._saved:
            obj, name = self._saved.pop()
            try:
                delattr(obj, name)
            except AttributeError:
                pass

    def idle(self, stream) -> bool:
        """Nothing to flush and nothing for the IOPub thread to do: a flush would change nothing."""
        if stream.echo is not None or stream._buffers:
            return False
        with self._lock:
            return self._pending == 0

    def flush(self, stream) -> None:
        pub = stream.pub_thread
        thread = getattr(pub, "thread", None)
        if pub is None or thread is None or not thread.is_alive() or thread.ident == threading.get_ident():
            stream._flush()  # ipykernel's own choice here: no IOPub thread to hand it to (a fork, shutdown)
            return
        if self.idle(stream):
            return
        done = threading.Event()

        def flush_then_signal() -> None:
            try:
                stream._flush()
            finally:
                done.set()

        pub.schedule(flush_then_signal)
        if not done.wait(stream.flush_timeout):
            print("IOStream.flush timed out", file=sys.__stderr__)

    def _set(self, obj, name: str, value) -> None:
        setattr(obj, name, value)
        self._saved.append((obj, name))

    def _after_fork(self) -> None:
        self._lock = threading.Lock()

    def _enter(self) -> None:
        with self._lock:
            self._pending += 1

    def _leave(self) -> None:
        with self._lock:
            self._pending -= 1

    def _run(self, f) -> None:
        try:
            f()
        finally:
            self._leave()


def _patchable(stream) -> bool:
    """An ipykernel OutStream of the version this was written against (the attributes used here)."""
    return all(hasattr(stream, name) for name in ("pub_thread", "_buffers", "_flush", "echo", "flush_timeout")) \
        and all(hasattr(getattr(stream, "pub_thread", None), name) for name in ("schedule", "thread"))


def install(streams=None) -> LeanFlush | None:
    lean = LeanFlush(streams if streams is not None else (sys.stdout, sys.stderr))
    return lean if lean.install() else None
