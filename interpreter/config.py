"""Paths and constants of the host side. Anything tunable is read here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNEL_IMAGES_DIR = REPO_ROOT / "kernel-images"
TEMPLATES_DIR = REPO_ROOT / "templates"
GUEST_PACKAGE_DIR = REPO_ROOT / "guest" / "vmcell_guest"

DEFAULT_TEMPLATE = "python"
# Where `vmcell serve` listens unless told otherwise, and where clients look for it.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8890
QEMU_BINARY = "qemu-system-x86_64"
QEMU_IMG_BINARY = "qemu-img"
# Debian packages the host needs (the Makefile's `setup` installs exactly these).
DEBIAN_HOST_PACKAGES = ("qemu-system-x86", "qemu-utils", "mmdebstrap", "e2fsprogs", "cpio", "python3-venv",
                        "chromium")  # chromium: the JupyterLab browser test (Playwright drives it)
# Debian package that provides each host tool, for error messages that name the fix.
HOST_TOOL_PACKAGES = {
    QEMU_BINARY: "qemu-system-x86",
    QEMU_IMG_BINARY: "qemu-utils",
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
}

# QEMU's TCG translation cache per VM, in MiB (`-accel tcg,tb-size=`). QEMU 7.2's default is 1 GiB:
# translated code is only dropped when the cache fills, so a session that ran varied code keeps up to
# 1 GiB of it resident while idle (THP-backed). Measured here (2 vCPU, python template): a fresh idle
# session holds ~18 MiB of it, ~56 MiB after pandas/matplotlib/sqlite cells; 64 MiB ran those cells
# as fast as 1 GiB (within noise), 32 MiB ~30 % slower on repeats, 16 MiB thrashed (`1+1` 470 ms).
TCG_TB_SIZE_MIB = 64

# Confinement of each VM's QEMU (interpreter/jail/). QEMU's seccomp filter, always on: no obsolete
# syscalls, no set*id, no spawning processes, no changing its own priorities or affinities.
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# A uid per jailed QEMU from this range (no account uses it; the gid equals the uid).
JAIL_UID_BASE = 1_800_000_000
JAIL_UID_COUNT = 1_000_000
# A VM's host cgroup memory limit is its guest RAM plus this: QEMU's own memory (the TCG translation
# cache, TCG_TB_SIZE_MIB, its heap, I/O buffers, the pages a snapshot reads). Its pids limit covers
# QEMU's threads (vCPUs, I/O workers, migration) with room to spare.
QEMU_MEMORY_OVERHEAD_MIB = 384
QEMU_PIDS_MAX = 256
# A VM's CPU quota is its vCPUs, but at most the host's cores minus these: one VM pinning its vCPUs
# at 100 % cannot take the cores the server and the other sessions need to answer.
QEMU_CPU_RESERVE_CORES = 1

# CONFIG_HZ of the pinned Debian kernel (kernel-images/recipe.toml): lpj = TSC Hz / HZ under TCG.
GUEST_KERNEL_HZ = 250
# The frequency of the local APIC bus QEMU's TCG emulates (hw/intc/apic_common.c: one tick per ns). Told
# to the guest as lapic_timer_period (bus ticks per jiffy) because TCG guests have no PIT to measure it
# against (accel.py); the guest's lapic clock event then runs at this / 16 (its divider): 62.5 MHz.
TCG_APIC_BUS_HZ = 1_000_000_000

# Labels the initramfs looks for (kernel-images/initramfs/init).
ROOT_FS_LABEL = "vmcell-root"
RW_FS_LABEL = "vmcell-rw"

# Seconds to wait for a cold-booted guest agent, and for a restored one.
COLD_BOOT_TIMEOUT_S = 120.0
RESTORE_TIMEOUT_S = 30.0
# Graceful QEMU stop before SIGKILL.
VM_STOP_GRACE_S = 3.0
# Kernel: output kept per cell (past it the result says truncated); cells allowed to wait for a busy
# kernel from the API (past it: 429) and from gateway websockets (a notebook's "run all");
# how long an interrupted cell gets to stop before the processes it started are killed, and then
# before the kernel is restarted; how long a (re)started kernel gets to answer.
OUTPUT_CAP_BYTES = 16 * 1024 * 1024
CELL_QUEUE_LIMIT = 32
GATEWAY_QUEUE_LIMIT = 1000
INTERRUPT_GRACE_S = 5.0
KILL_GRACE_S = 5.0
KERNEL_READY_TIMEOUT_S = 120.0
# (The kernel cgroup's limits inside the guest, processes and memory, are the guest's to choose:
# guest/vmcell_guest/cgroup.py derives them from the VM's memory. kernel_start `limits` overrides.)
# Ids of sessions that ended are remembered (to answer 410 with the cause instead of 404) up to this many.
ENDED_SESSIONS_REMEMBERED = 10_000
# Sessions running at once in one manager (paused and saved ones count too; pooled ones do not).
DEFAULT_MAX_SESSIONS = 64
# Lifecycle (sessions/settings.py): idle seconds before a session's VM is stopped (QMP stop: no CPU).
DEFAULT_AUTO_PAUSE_S = 60.0
# How many sessions one fork request may make at most (and never past the session limit).
MAX_FORK_COUNT = 16
# Code contexts per session besides its default kernel (sessions/contexts.py); each is a kernel in the
# session's VM (a forked Python kernel holds ~30-60 MiB of its own). At most wire.MAX_CONTEXT_SLOT.
MAX_CONTEXTS = 8
# How often a server checks whether the sources of the templates it serves changed since it
# resolved them (it keeps serving the build it started with; /health and the log say a rebuild is pending).
TEMPLATE_CHECK_EVERY_S = 60.0

# MCP tools (interpreter/mcp_server.py): text per content block handed to an LLM (longer is cut, with a
# note), run_command's default and longest timeout, the longest line (one JSON-RPC message) on stdio.
MCP_TEXT_LIMIT_CHARS = 64_000
MCP_PROGRESS_LIMIT_CHARS = 4_000  # per progress notification of a running cell's output
MCP_COMMAND_TIMEOUT_S = 60.0
MCP_COMMAND_TIMEOUT_MAX_S = 3600.0
MCP_STDIN_LINE_LIMIT = 64 * 1024 * 1024
# One /mcp request body: room for write_file with the largest file the guest takes (16 MiB, base64).
MCP_MAX_REQUEST_BYTES = 24 * 1024 * 1024

def vmcell_home() -> Path:
    return Path(os.environ.get("VMCELL_HOME") or Path.home() / ".cache" / "vmcell")


def images_dir() -> Path:
    return vmcell_home() / "images"


def templates_cache_dir() -> Path:
    return vmcell_home() / "templates"


def run_dir() -> Path:
    """Per-VM working directories (sockets, overlay disk, console log): reaped on close and on next start."""
    return vmcell_home() / "run"


def state_dir() -> Path:
    """Durable sessions (`vmcell serve`): the registry, their VMs, saved states and fork snapshots."""
    return vmcell_home() / "sessions"


def downloads_dir() -> Path:
    return vmcell_home() / "downloads"
