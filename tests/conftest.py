import asyncio
import os

import pytest

from interpreter.config import DEFAULT_TEMPLATE
from interpreter.progress import Progress
from interpreter.sessions import SessionManager


@pytest.fixture(scope="session")
def built_template():
    """The default template, built if missing (minutes the first time under TCG; cached after)."""
    from interpreter.templates import build_template
    from interpreter.vm import QemuBackend

    return asyncio.run(build_template(DEFAULT_TEMPLATE, QemuBackend(), Progress()))


@pytest.fixture
async def manager(built_template):
    async with SessionManager() as m:
        yield m


def qemu_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"qemu-system" in f.read().split(b"\0")[0]:
                        pids.add(int(entry))
            except OSError:
                pass
    return pids
