"""Unit tests of the jail's pure parts: qcow2 backing chains, cgroup detection (v1 and v2 on fake
trees), the uid allocator, sealed RAM copies, bind planning. The jail itself is tested with real
VMs in test_containment.py."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from interpreter.errors import HostSetupError
from interpreter.jail.cgroups import CgroupLimits, detect_host_cgroups
from interpreter.jail.files import backing_chain, qcow2_backing
from interpreter.jail.jailer import _dedupe
from interpreter.jail.plan import Bind
from interpreter.jail.sealed_ram import SealedImages, sealed_copy
from interpreter.jail.uids import UidAllocator


def _qcow2(path: Path, backing: str | None) -> Path:
    header = bytearray(512)
    header[:4] = b"QFI\xfb"
    if backing is not None:
        name = backing.encode()
        header[8:20] = struct.pack(">QI", 256, len(name))
        header[256:256 + len(name)] = name
    path.write_bytes(bytes(header))
    return path


def test_backing_chain_follows_qcow2_headers(tmp_path):
    raw = tmp_path / "base.img"
    raw.write_bytes(b"\0" * 4096)
    middle = _qcow2(tmp_path / "middle.qcow2", str(raw))
    top = _qcow2(tmp_path / "top.qcow2", "middle.qcow2")  # relative: against the image's directory
    assert qcow2_backing(raw) is None
    assert backing_chain(top) == [middle, raw]
    assert backing_chain(_qcow2(tmp_path / "alone.qcow2", None)) == []


def test_backing_chain_refuses_a_loop(tmp_path):
    _qcow2(tmp_path / "a.qcow2", "b.qcow2")
    _qcow2(tmp_path / "b.qcow2", "a.qcow2")
    with pytest.raises(HostSetupError, match="loops"):
        backing_chain(tmp_path / "a.qcow2")


def _fake_v1(tmp_path: Path, writable: bool = True) -> tuple[str, str]:
    lines, own = [], []
    for i, controller in enumerate(("cpu", "memory", "pids")):
        mount = tmp_path / controller
        (mount / "inside").mkdir(parents=True)
        if not writable:
            mount.joinpath("inside").chmod(0o500)
        lines.append(f"cgroup {mount} cgroup rw,relatime,{controller} 0 0")
        own.append(f"{i + 1}:{controller}:/inside")
    lines.append(f"cgroup2 {tmp_path / 'unified'} cgroup2 rw 0 0")
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("\n")  # hybrid: v2 has no controllers
    own.append("0::/")
    mounts, cgroup = tmp_path / "mounts", tmp_path / "cgroup"
    mounts.write_text("\n".join(lines) + "\n")
    cgroup.write_text("\n".join(own) + "\n")
    return str(mounts), str(cgroup)


def test_cgroup_v1_nests_under_the_servers_own_cgroups_and_writes_limits(tmp_path):
    cgroups, why = detect_host_cgroups(*_fake_v1(tmp_path))
    assert cgroups is not None and cgroups.version == "v1", why
    assert cgroups.bases["memory"] == tmp_path / "memory" / "inside" / "vmcell"
    procs = cgroups.create("vm1", CgroupLimits(cpu_cores=2, memory_bytes=1408 * 2**20, pids_max=256))
    assert set(procs) == {tmp_path / c / "inside" / "vmcell" / "vm1" / "cgroup.procs" for c in ("cpu", "memory", "pids")}
    vm = lambda c, f: (tmp_path / c / "inside" / "vmcell" / "vm1" / f).read_text()  # noqa: E731
    assert vm("cpu", "cpu.cfs_quota_us") == "200000" and vm("cpu", "cpu.cfs_period_us") == "100000"
    assert vm("memory", "memory.limit_in_bytes") == str(1408 * 2**20)
    assert vm("pids", "pids.max") == "256"
    assert cgroups.names() == {"vm1"}


def test_cgroup_v2_is_preferred_when_it_has_the_controllers(tmp_path):
    mount = tmp_path / "cg2"
    mount.mkdir()
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (mount / "cgroup.subtree_control").write_text("")
    mounts, cgroup = tmp_path / "mounts", tmp_path / "cgroup"
    mounts.write_text(f"cgroup2 {mount} cgroup2 rw 0 0\n")
    cgroup.write_text("0::/\n")
    cgroups, why = detect_host_cgroups(str(mounts), str(cgroup))
    assert cgroups is not None and cgroups.version == "v2", why
    assert (mount / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    cgroups.create("vm1", CgroupLimits(cpu_cores=1.5, memory_bytes=2**30, pids_max=64))
    assert (mount / "vmcell" / "vm1" / "cpu.max").read_text() == "150000 100000"
    assert (mount / "vmcell" / "vm1" / "memory.max").read_text() == str(2**30)
    assert (mount / "vmcell" / "vm1" / "pids.max").read_text() == "64"


def test_no_usable_cgroups_says_why(tmp_path):
    mounts, cgroup = tmp_path / "mounts", tmp_path / "cgroup"
    mounts.write_text("proc /proc proc rw 0 0\n")
    cgroup.write_text("0::/\n")
    cgroups, why = detect_host_cgroups(str(mounts), str(cgroup))
    assert cgroups is None and "memory and pids" in why


def test_uids_are_unique_and_in_range():
    uids = UidAllocator(base=5000, count=3)
    taken = {uids.take() for _ in range(3)}
    assert taken == {5000, 5001, 5002}
    with pytest.raises(RuntimeError):
        uids.take()
    uids.release(5001)
    assert uids.take() == 5001
    assert not uids.hold(4999) and not uids.owns(5003)


def test_sealed_copy_keeps_data_and_holes_and_refuses_writes(tmp_path):
    image = tmp_path / "memory.bin"
    with open(image, "wb") as f:
        f.truncate(64 * 4096)
        f.seek(5 * 4096)
        f.write(b"x" * 4096)
    fd = sealed_copy(image)
    try:
        assert os.fstat(fd).st_size == 64 * 4096
        assert os.pread(fd, 4096, 5 * 4096) == b"x" * 4096
        assert os.pread(fd, 4096, 0) == b"\0" * 4096
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"y", 0)
        # Reopened read-write through /proc (what QEMU does), it still cannot be written.
        again = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.write(again, b"y")
        finally:
            os.close(again)
    finally:
        os.close(fd)


def test_sealed_images_reuse_one_fd_and_drop_it_with_the_file(tmp_path):
    image = tmp_path / "memory.bin"
    image.write_bytes(b"a" * 4096)
    images = SealedImages()
    fd = images.fd_for(image)
    assert images.fd_for(image) == fd
    image.unlink()
    other = tmp_path / "other.bin"
    other.write_bytes(b"b" * 4096)
    images.fd_for(other)  # sweeps the memfd of the deleted file
    assert [key[0] for key in images._fds] == [other]
    images.close()


def test_binds_deduplicate_and_a_writable_bind_wins():
    binds = _dedupe([Bind(Path("/a/b/c")), Bind(Path("/a")), Bind(Path("/a/b/c"), writable=True)])
    assert [b.source for b in binds] == [Path("/a"), Path("/a/b/c")]
    assert binds[1].writable


def test_cpu_quota_is_the_vcpus_but_never_the_hosts_last_core():
    from types import SimpleNamespace

    from interpreter.jail.jailer import jail_limits

    vm = SimpleNamespace(vcpus=2, memory_mib=1024)
    assert jail_limits(vm, host_cores=2).cpu_cores == 1
    assert jail_limits(vm, host_cores=8).cpu_cores == 2
    assert jail_limits(vm, host_cores=1).cpu_cores == 1
    assert jail_limits(vm, host_cores=8).memory_bytes > 1024 * 2**20
