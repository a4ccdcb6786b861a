"""Progress for long work (image builds take minutes under TCG): one line per step, a live timer on a TTY."""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, total_steps: int | None = None):
        self.stream = stream or sys.stderr
        self.total = total_steps
        self.done = 0
        self._live = self.stream.isatty()

    def note(self, message: str) -> None:
        print(f"      {message}", file=self.stream, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.done += 1
        tag = f"[{self.done}/{self.total}]" if self.total else f"[{self.done}]"
        start = time.monotonic()
        stop = threading.Event()
        ticker = None
        if self._live:
            def tick() -> None:
                frames = "|/-\\"
                i = 0
                while not stop.wait(0.25):
                    i += 1
                    elapsed = time.monotonic() - start
                    print(f"\r{tag} {title} {frames[i % 4]} {elapsed:5.0f}s", end="", file=self.stream, flush=True)
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        else:
            print(f"{tag} {title} ...", file=self.stream, flush=True)
        try:
            yield
        except BaseException:
            stop.set()
            print(f"\r{tag} {title}: FAILED after {time.monotonic() - start:.1f}s", file=self.stream, flush=True)
            raise
        finally:
            stop.set()
            if ticker:
                ticker.join()
        print(f"\r{tag} {title}: done in {time.monotonic() - start:.1f}s   ", file=self.stream, flush=True)


class QuietProgress(Progress):
    """For callers (tests, the server) that build silently."""

    def __init__(self) -> None:
        super().__init__(stream=open("/dev/null", "w"))
