"""The durable-session registry's own logic (sessions/registry.py); the real restarts are in test_durable.py."""

import json
import subprocess
import sys
from dataclasses import asdict

import pytest

from interpreter.sessions.registry import SessionRecord, SessionRegistry, StateDirBusy


def record(**changes) -> SessionRecord:
    base = dict(id="s1", template="python", build="abc", state="running", workdir="/w/s1", base_memory="/t/memory.bin",
                base_state="/t/state.bin", fork_capture=None, generation=0, hostname="vmcell-s1",
                machine_id="0" * 32, created_at=1.0, last_activity=2.0, env={"A": "1"})
    return SessionRecord(**{**base, **changes})


def test_rows_round_trip_are_replaced_atomically_and_forgotten(tmp_path):
    registry = SessionRegistry(tmp_path / "state")
    registry.open()
    try:
        registry.put(record())
        registry.put(record(state="saved", generation=1))  # the same id: replaced, not added
        registry.put(record(id="s2", expires_at=99.5, kernel_name="python3"))
        assert sorted(registry.records(), key=lambda r: r.id) == [record(state="saved", generation=1),
                                                                  record(id="s2", expires_at=99.5, kernel_name="python3")]
        registry.forget("s1")
        assert [r.id for r in registry.records()] == ["s2"]
        assert oct((tmp_path / "state" / "registry.sqlite3").stat().st_mode & 0o777) == "0o600"  # env may hold secrets
    finally:
        registry.close()


@pytest.mark.parametrize("damage", [
    lambda d: d.pop("build"), lambda d: d.update(state="closed"), lambda d: d.update(generation="1"),
    lambda d: d.update(env=["A"]), lambda d: d.update(unknown=1), lambda d: d.update(kernel_name=3)])
def test_an_unreadable_row_is_dropped_not_guessed_at(tmp_path, damage):
    registry = SessionRegistry(tmp_path / "state")
    registry.open()
    try:
        data = asdict(record())
        damage(data)
        registry._db.execute("INSERT INTO sessions VALUES (?, ?)", ("s1", json.dumps(data)))
        registry.put(record(id="s2"))
        assert [r.id for r in registry.records()] == ["s2"]
        assert [r.id for r in registry.records()] == ["s2"]  # and deleted
    finally:
        registry.close()


def test_one_server_per_state_dir(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from interpreter.sessions.registry import SessionRegistry\n"
        f"r = SessionRegistry(Path({str(tmp_path / 'state')!r})); r.open(); print('open', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StateDirBusy, match=f"pid {holder.pid}"):
            SessionRegistry(tmp_path / "state").open()
    finally:
        holder.kill()
        holder.wait()
    registry = SessionRegistry(tmp_path / "state")
    registry.open()  # a killed holder's lock is gone with it
    registry.close()


def test_directories_no_row_names_are_reaped_with_their_qemu(tmp_path):
    registry = SessionRegistry(tmp_path / "state")
    registry.open()
    try:
        kept, stray, capture = registry.vms / "kept", registry.vms / "stray", registry.forks / "old"
        for path in (kept, stray, capture):
            path.mkdir()
        # A stand-in for the stray VM's QEMU: the pid record names it (pid + start time).
        sleeper = subprocess.Popen(["sleep", "60"])
        from interpreter.vm.workdir import process_start_time

        (stray / "qemu.pid").write_text(json.dumps({"pid": sleeper.pid, "start_time": process_start_time(sleeper.pid)}))
        assert sorted(registry.reap_unowned({kept}, set())) == ["old", "stray"]
        assert sleeper.wait(10) == -9
        assert kept.is_dir() and not stray.exists() and not capture.exists()
    finally:
        registry.close()
