"""Every failure vmcell reports has its own type, and a message that says how to fix it."""

from vmcell_guest.wire import ProtocolError


class VmcellError(Exception):
    """Base of all vmcell errors."""


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


class VMStartError(VmcellError):
    """QEMU exited or never became reachable while starting or restoring a VM."""


class SnapshotError(VmcellError):
    """Saving a VM's state failed."""


class SessionNotFound(VmcellError):
    """No live session has this id."""


class SessionLimitReached(VmcellError):
    """The configured maximum number of sessions is running."""


class GuestProtocolError(VmcellError, ProtocolError):
    """The guest sent something outside the link protocol; the link is closed and the session failed."""


class GuestOperationError(VmcellError):
    """The guest agent answered a control request with an error."""

    def __init__(self, op: str, kind: str, message: str):
        super().__init__(f"guest agent op {op!r} failed: {kind}: {message}")
        self.op, self.kind, self.message = op, kind, message


class LinkClosed(VmcellError):
    """The guest link closed (the VM stopped or the link failed) while a request was pending."""


class GuestTimeout(VmcellError):
    """The guest did not answer a control request in time."""


class KernelNotReady(VmcellError):
    """The guest kernel did not start or answer in time."""


class CellQueueFull(VmcellError):
    """Too many cells are already waiting for this session's kernel."""
