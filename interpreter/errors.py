"""Every failure vmcell reports has its own type, and a message that says how to fix it.

Each type carries the HTTP status it means (`http_status`), so the server maps failures in one
place and a guest or VM fault is never a 500.
"""

from vmcell_guest.wire import ProtocolError


class VmcellError(Exception):
    """Base of all vmcell errors."""

    http_status = 500


class HostSetupError(VmcellError):
    """The host lacks something vmcell needs (a binary, a package, a writable directory)."""


class VMMNotFound(HostSetupError):
    """No QEMU binary: the message names the package to install."""


class ImageBuildError(VmcellError):
    """Building the guest kernel, initramfs or root filesystem failed."""


class TemplateBuildError(VmcellError):
    """Booting, warming or snapshotting a template failed (the message carries the guest console's tail)."""


class TemplateMissing(VmcellError):
    """The template is unknown or has not been built (or was built from other inputs)."""

    http_status = 404


class VMStartError(VmcellError):
    """QEMU exited or never became reachable while starting or restoring a VM."""

    http_status = 503


class SnapshotError(VmcellError):
    """Saving a VM's state failed."""


class SessionNotFound(VmcellError):
    """No session with this id was ever seen by this server."""

    http_status = 404


class SessionLimitReached(VmcellError):
    """The configured maximum number of sessions is running."""

    http_status = 409


class ContextNotFound(VmcellError):
    """No code context with that id in the session (never made, or removed)."""

    http_status = 404


class ContextLimitReached(VmcellError):
    """The session has as many code contexts as it may (config.MAX_CONTEXTS)."""

    http_status = 409


class InvalidRequest(VmcellError):
    """A request the session layer refuses as malformed (e.g. a fork count out of range)."""

    http_status = 400


class CellQueueFull(VmcellError):
    """Too many cells are already waiting for this session's kernel."""

    http_status = 429


# ---- a session that is gone: its cells end with one of these, later requests get 410 -------------


class SessionGone(VmcellError):
    """The session ended; the message names it and says why. Nothing more will run in it."""

    http_status = 410


class SessionClosed(SessionGone):
    """The session was closed (by a client, its lifetime or idle timeout, or the server stopping)."""


class VMDied(SessionGone):
    """The session's VM exited or its guest link broke: the session is dead."""


class SavedStateMissing(SessionGone):
    """A session saved to disk cannot come back: files of its saved state were deleted (named)."""


class ServerRestarted(VmcellError):
    """A cell was running when the server stopped or crashed; the session lives on, the cell's
    outcome is unknown (it was interrupted when the server came back)."""

    http_status = 409


# ---- the kernel inside a live session --------------------------------------------------------------


class KernelDied(VmcellError):
    """The kernel process exited mid-cell (os._exit, out of memory, a crash). The session lives on:
    the kernel is restarted, its variables are lost."""

    http_status = 409


class MemoryLimitExceeded(KernelDied):
    """The kernel ran into its memory limit and the guest's OOM killer killed it mid-cell (one big
    allocation, a C extension: what the high-water interrupt could not stop in time). The session
    lives on: the kernel is restarted, its variables are lost. (A cell interrupted at the
    high-water mark is not a fault: its result's error is named MemoryLimitExceeded, and the
    kernel keeps its variables.)"""


class KernelNotReady(VmcellError):
    """The guest kernel did not start or answer in time."""

    http_status = 503


# ---- the guest: untrusted, so its faults are the guest's (5xx of a gateway), never ours ----------


class GuestProtocolError(VmcellError, ProtocolError):
    """The guest sent something outside the link or Jupyter protocol."""

    http_status = 502


class LinkClosed(VmcellError):
    """The guest link closed (the VM stopped or the link failed) while a request was pending."""

    http_status = 502


class GuestTimeout(VmcellError):
    """The guest did not answer a control request in time."""

    http_status = 504


class GuestOperationError(VmcellError):
    """The guest agent answered a control request with an error (see AgentClient for the kinds)."""

    http_status = 502

    def __init__(self, op: str, kind: str, message: str):
        super().__init__(f"guest agent op {op!r} failed: {kind}: {message}")
        self.op, self.kind, self.message = op, kind, message


class GuestBadRequest(GuestOperationError):
    """The request was invalid for the guest (bad path, bad arguments, a directory where a file was meant)."""

    http_status = 400


class GuestFileNotFound(GuestOperationError):
    http_status = 404


class GuestPermissionDenied(GuestOperationError):
    http_status = 403


class GuestTooLarge(GuestOperationError):
    http_status = 413


class GuestNoKernel(GuestOperationError):
    """A kernel operation found no kernel running in the guest."""

    http_status = 409


class GuestBrokeLink(VMDied, GuestProtocolError):
    """The guest sent bytes outside the link protocol: the link is closed and its session is dead."""

    http_status = 410
