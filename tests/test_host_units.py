"""Pure host-side logic: accelerator choice, cache keys, the cpio writer, module order, the janitor."""

import io
import json
import subprocess
import time

import pytest

from interpreter.bench import percentile
from interpreter.images import cpio
from interpreter.images.cache import digest
from interpreter.images.kernel import resolve_module_order
from interpreter.config import GUEST_KERNEL_HZ, TCG_APIC_BUS_HZ, TCG_TB_SIZE_MIB
from interpreter.vm.accel import Accelerator, detect_accelerator
from interpreter.vm.clock import ROUND_TO_KHZ, host_tsc_khz, measure_tsc_khz
from interpreter.vm.workdir import Workdir, process_start_time, reap_stale_workdirs


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    return str(path)


def test_accelerator_kvm_needs_both_vt_flags_and_device(tmp_path):
    device = tmp_path / "kvm"
    device.write_text("")
    assert detect_accelerator(_cpuinfo(tmp_path, "vmx"), str(device), override="").name == "kvm"
    assert detect_accelerator(_cpuinfo(tmp_path, "svm"), str(device), override="").name == "kvm"
    pvm = detect_accelerator(_cpuinfo(tmp_path, ""), str(device), override="")
    assert pvm.name == "tcg" and "paravirtual" in pvm.reason
    assert detect_accelerator(_cpuinfo(tmp_path, "vmx"), str(tmp_path / "none"), override="").name == "tcg"
    forced = detect_accelerator(_cpuinfo(tmp_path, "vmx"), str(device), override="tcg")
    assert forced.name == "tcg" and "VMCELL_ACCEL" in forced.reason
    # Asking for KVM where it would not work is refused, and said so.
    refused = detect_accelerator(_cpuinfo(tmp_path, ""), str(device), override="kvm")
    assert refused.name == "tcg" and "ignored" in refused.reason


def test_tcg_gets_a_cpu_model_with_the_features_numpy_wheels_need():
    args = detect_accelerator(override="tcg").qemu_args
    assert args[args.index("-cpu") + 1] == "max" and args[args.index("-accel") + 1].startswith("tcg,thread=multi")


def test_tcg_translation_cache_is_bounded_but_stays_out_of_the_template_key():
    tcg = detect_accelerator(override="tcg")
    assert f"tcg,thread=multi,tb-size={TCG_TB_SIZE_MIB}" in tcg.qemu_args and 32 <= TCG_TB_SIZE_MIB <= 256
    # The key hashes machine_args: resizing the cache must not invalidate built templates.
    assert not any("tb-size" in arg for arg in tcg.machine_args)
    assert tcg.machine_args == ["-accel", "tcg,thread=multi", "-cpu", "max"]


def test_host_tsc_is_measured_stably_and_becomes_the_tcg_guests_clock_arguments():
    first, second = measure_tsc_khz(0.05), measure_tsc_khz(0.05)
    assert 100_000 < first < 10_000_000 and abs(first - second) < first * 1e-3  # 100 MHz..10 GHz, steady
    khz = host_tsc_khz()
    assert khz % ROUND_TO_KHZ == 0 and abs(khz - first) < first * 1e-3
    args = detect_accelerator(override="tcg").guest_kernel_args()
    assert args == (f"tsc_early_khz={khz}", f"lpj={khz * 1000 // GUEST_KERNEL_HZ}", "tsc=reliable",
                    f"lapic_timer_period={TCG_APIC_BUS_HZ // GUEST_KERNEL_HZ}")


def test_tcg_guests_have_no_pit_and_kvm_guests_keep_qemus_choice():
    tcg, kvm = detect_accelerator(override="tcg"), Accelerator("kvm", "test")
    assert tcg.microvm_options == ("pit=off",) and kvm.microvm_options == ()
    assert kvm.guest_kernel_args() == ()


def test_digest_is_stable_and_sensitive(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.py").write_text("x = 1\n")
    first = digest("k", tmp_path / "d", (1, 2))
    assert first == digest("k", tmp_path / "d", (1, 2))
    (tmp_path / "d" / "a.py").write_text("x = 2\n")
    assert digest("k", tmp_path / "d", (1, 2)) != first
    assert digest("k", (1, 2)) != digest("k", (2, 1))


def test_cpio_newc_is_deterministic_and_readable_by_cpio(tmp_path):
    entries = [cpio.directory("bin"), cpio.regular("bin/hello", b"hi\n", 0o755), cpio.char_device("console", 5, 1)]
    a, b = io.BytesIO(), io.BytesIO()
    cpio.write_newc(a, entries)
    cpio.write_newc(b, entries)
    assert a.getvalue() == b.getvalue() and len(a.getvalue()) % 4 == 0
    listing = subprocess.run(["cpio", "-t", "-v"], input=a.getvalue(), capture_output=True)
    if listing.returncode == 127:
        pytest.skip("cpio not installed")
    text = listing.stdout.decode()
    assert "bin/hello" in text and "console" in text and text.splitlines()[-1].startswith("c")


def test_module_order_puts_dependencies_first(tmp_path):
    def ko(name, deps):
        path = tmp_path / f"{name}.ko"
        path.write_bytes(b"\x7fELF...\0license=GPL\0depends=" + ",".join(deps).encode() + b"\0name=" + name.encode() + b"\0")
        return path

    mods = {"virtio_ring": ko("virtio_ring", []), "virtio": ko("virtio", ["virtio_ring"]),
            "virtio_blk": ko("virtio_blk", ["virtio", "virtio_ring"]), "ext4": ko("ext4", ["jbd2"]), "jbd2": ko("jbd2", [])}
    order = resolve_module_order(("ext4", "virtio_blk"), mods.__getitem__)
    assert order == ["jbd2", "ext4", "virtio_ring", "virtio", "virtio_blk"]


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5
    assert percentile(list(range(101)), 95) == 95


def test_janitor_kills_orphaned_process_and_removes_its_directory(tmp_path):
    # A workdir whose owner is gone but whose "qemu" still runs: what a SIGKILLed owner leaves if
    # PDEATHSIG could not act (e.g. the owner thread had already exited).
    orphan = subprocess.Popen(["sleep", "300"])
    try:
        dead_owner = subprocess.Popen(["true"])
        dead_owner.wait()
        wd = tmp_path / "deadbeef0001"
        wd.mkdir()
        (wd / "owner").write_text(json.dumps({"pid": dead_owner.pid, "start_time": 1}))
        (wd / "qemu.pid").write_text(json.dumps({"pid": orphan.pid, "start_time": process_start_time(orphan.pid)}))
        (wd / "rw.qcow2").write_bytes(b"overlay")
        live = Workdir.create(tmp_path)  # ours: must survive
        assert reap_stale_workdirs(tmp_path) == ["deadbeef0001"]
        assert orphan.wait(timeout=5) == -9
        assert not wd.exists() and live.path.exists()
    finally:
        orphan.kill()


def test_janitor_does_not_kill_a_recycled_pid(tmp_path):
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        wd = tmp_path / "deadbeef0002"
        wd.mkdir()
        (wd / "owner").write_text(json.dumps({"pid": 999999999, "start_time": 1}))
        # Same pid, other start time: not the qemu we started, so it must be left alone.
        (wd / "qemu.pid").write_text(json.dumps({"pid": bystander.pid, "start_time": 12345}))
        reap_stale_workdirs(tmp_path)
        time.sleep(0.1)
        assert bystander.poll() is None and not wd.exists()
    finally:
        bystander.kill()


def test_capture_release_finds_the_pages_that_were_not_held(tmp_path):
    import mmap
    import os

    from interpreter.vm import reclaim

    page = reclaim.PAGE_SIZE
    assert reclaim.absent_ranges(b"\x01\x00\x00\x01\x00", 0x10000) == [(0x10000 + page, 2 * page),
                                                                     (0x10000 + 4 * page, page)]
    assert reclaim.absent_ranges(b"\x01\x01", 0) == []
    # A private file mapping like a session's RAM: pages read show as resident (the kernel maps their
    # cached neighbours too), and paging out drops them (clean, mapped by this process alone).
    image = tmp_path / "memory.bin"
    image.write_bytes(b"\x07" * (8 * page))
    with open(image, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 8 * page, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    try:
        start, end = reclaim.mapping_of(os.getpid(), image)
        assert end - start == 8 * page
        for i in (0, 1, 5):
            assert mapped[i * page] == 7
        resident = reclaim.resident_pages(os.getpid(), start, end)
        assert len(resident) == 8 and all(resident[i] == 1 for i in (0, 1, 5)) and set(resident) <= {0, 1}
        try:
            reclaim.page_out(os.getpid(), [(start, 8 * page)])
        except PermissionError:
            pytest.skip("process_madvise needs CAP_SYS_NICE")
        assert reclaim.resident_pages(os.getpid(), start, end) == bytes(8)
    finally:
        mapped.close()
