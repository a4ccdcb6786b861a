"""A VMM process this server did not start: adopted after a restart, watched through a pidfd.

It quacks like asyncio.subprocess.Process where QemuVM needs it (pid, returncode, wait, kill). The
exit status of a process that is not our child is not ours to collect (its parent, init, reaps it),
so an adopted process's returncode is ADOPTED_EXIT once it is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal

from .workdir import process_start_time

ADOPTED_EXIT = 255  # "exited, status unknown": see exit_description in qemu.py


class AdoptedProcess:
    def __init__(self, pid: int, start_time: int):
        if process_start_time(pid) != start_time:
            raise ProcessLookupError(f"process {pid} is gone (or its pid was reused)")
        self.pid = pid
        self._fd = os.pidfd_open(pid)
        self.returncode: int | None = None
        self._exited = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(self._fd, self._on_exit)
        if process_start_time(pid) != start_time:  # exited (and the pid reused) before the pidfd existed
            self._on_exit()

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.returncode = ADOPTED_EXIT
        if not self._exited.done():
            self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def kill(self) -> None:
        if self._fd >= 0:
            try:
                signal.pidfd_send_signal(self._fd, signal.SIGKILL)  # never a recycled pid
            except ProcessLookupError:
                pass
