"""The template catalog: each template resolved once per process and pinned; leases; rebuild pending."""

import asyncio
import hashlib
import io
import json
import logging
import shutil
import time
from pathlib import Path

import pytest

import interpreter.images.cache as cache
import interpreter.images.kernel as kernel_images
from interpreter import templates
from interpreter.catalog import TemplateCatalog
from interpreter.config import DEFAULT_TEMPLATE, GUEST_PACKAGE_DIR, templates_cache_dir
from interpreter.errors import TemplateBuildError, TemplateMissing
from interpreter.progress import Progress
from interpreter.server.gateway import kernelspecs
from interpreter.sessions import SessionManager
from interpreter.templates import Lease, build_template, find_built, lease_held, remove_superseded
from interpreter.vm import QemuBackend

CHANGED_LINE = ("template 'python' sources changed since this server started; serving build {key} until restart; "
                "run vmcell template build python, then restart")


class Counter:
    def __init__(self):
        self.calls = 0


@pytest.fixture
def hashing(monkeypatch):
    """Counts every key computation (all go through images.cache.digest) and every file read."""
    counter = Counter()

    class CountingHashlib:
        @staticmethod
        def sha256(*args):
            counter.calls += 1
            return hashlib.sha256(*args)

    monkeypatch.setattr(cache, "hashlib", CountingHashlib)
    counter.reads = 0
    for method in ("read_bytes", "read_text"):
        original = getattr(Path, method)

        def counted(self, *args, _original=original, **kwargs):
            counter.reads += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Path, method, counted)
    return counter


@pytest.fixture
def changed_guest_code(monkeypatch, tmp_path):
    """What a `git pull` that edits guest code does to the template key: a copy of the guest package
    with one more module (deterministic, so its images are cached across runs)."""
    copy = tmp_path / "vmcell_guest"
    shutil.copytree(GUEST_PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def change():
        (copy / "zz_changed_by_a_pull.py").write_text("# a guest module added after the server started\n")
        monkeypatch.setattr(kernel_images, "GUEST_PACKAGE_DIR", copy)

    return change


def fake_build(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "meta.json").write_text(json.dumps({"kernel_key": "k", "built_at": 0}))


# ---- no VM --------------------------------------------------------------------------------------


async def test_a_template_missing_at_first_is_found_once_built_and_listings_do_not_rehash(monkeypatch, tmp_path):
    monkeypatch.setenv("VMCELL_HOME", str(tmp_path))
    plans = Counter()
    real_plan = templates.plan_template

    def counted_plan(*args):
        plans.calls += 1
        return real_plan(*args)

    monkeypatch.setattr(templates, "plan_template", counted_plan)
    async with TemplateCatalog() as catalog:
        with pytest.raises(TemplateMissing, match="vmcell template build python"):
            await catalog.get(DEFAULT_TEMPLATE)
        assert plans.calls == 1
        for _ in range(20):  # kernelspecs on every request: the miss is remembered while nothing was built
            assert await catalog.ready([DEFAULT_TEMPLATE]) == {}
        assert plans.calls == 1
        with pytest.raises(TemplateMissing):  # a session create always looks again
            await catalog.get(DEFAULT_TEMPLATE)
        assert plans.calls == 2
        # `vmcell template build` in another shell: the build directory appears
        planned = await templates.planned_template(templates.load_template(DEFAULT_TEMPLATE), catalog.backend)
        fake_build(planned.directory)
        found = await catalog.ready([DEFAULT_TEMPLATE, "nope"])
        assert list(found) == [DEFAULT_TEMPLATE] and found[DEFAULT_TEMPLATE].key == planned.key
        assert lease_held(planned.directory)
        calls = plans.calls
        assert (await catalog.get(DEFAULT_TEMPLATE)).directory == planned.directory
        assert plans.calls == calls
    assert not lease_held(planned.directory)  # released with the catalog


def test_cleanup_skips_leased_builds_and_only_touches_its_own_template(monkeypatch, tmp_path):
    monkeypatch.setenv("VMCELL_HOME", str(tmp_path))
    root = templates_cache_dir()
    current, leased, old = (root / f"python-{c * 16}" for c in "abc")
    other_template, scratch = root / f"python-ml-{'d' * 16}", root / f".python-{'e' * 16}.partial-1"
    for directory in (current, leased, old, other_template, scratch):
        fake_build(directory)
    lease = Lease.take(leased)
    assert lease is not None and lease_held(leased)
    assert Lease.take(root / "python-nothing-here") is None
    out = io.StringIO()
    removed, kept = remove_superseded("python", current, Progress(out))
    assert removed == [old] and kept == [leased]
    assert f"kept superseded build {leased.name}" in out.getvalue() and "lease is held" in out.getvalue()
    assert current.is_dir() and leased.is_dir() and other_template.is_dir() and scratch.is_dir()
    assert not old.exists()
    lease.release()
    assert remove_superseded("python", current) == ([leased], [])
    assert not leased.exists() and [p.name for p in templates.builds_of("python")] == [current.name]


# ---- real VMs -----------------------------------------------------------------------------------


@pytest.mark.vm
async def test_lookups_after_the_first_do_not_hash_and_sessions_restore(built_template, hashing):
    async with TemplateCatalog() as catalog:
        first = await catalog.get(DEFAULT_TEMPLATE)
        assert first.directory == built_template.directory
        assert hashing.calls > 0  # the first lookup hashes the sources (in a worker thread)
        hashing.calls = hashing.reads = 0
        for _ in range(200):
            assert await catalog.get(DEFAULT_TEMPLATE) is first
        assert await catalog.ready([DEFAULT_TEMPLATE]) == {DEFAULT_TEMPLATE: first}
        assert catalog.status() == {DEFAULT_TEMPLATE: {"key": first.key, "rebuild_pending": False,
                                                       "planned_key": first.key}}
        assert hashing.calls == 0 and hashing.reads == 0
        async with SessionManager(catalog=catalog) as manager:
            session = await manager.create()
            again = await manager.create()
            assert (await session.execute("1 + 1")).results[0].text == "2"
            assert session.template is first and again.template is first
            specs = await kernelspecs(manager)
            assert DEFAULT_TEMPLATE in specs
        assert hashing.calls == 0  # two restores and a kernelspec listing: no hashing
        assert lease_held(first.directory)  # the catalog was passed in: its owner releases it
    assert not lease_held(first.directory)


@pytest.mark.vm
async def test_changed_sources_keep_the_served_build_and_health_says_rebuild_pending(api, changed_guest_code,
                                                                                       caplog):
    caplog.set_level(logging.INFO, logger="vmcell.catalog")
    catalog = api.manager.catalog
    created = await api("POST", "/sessions")
    assert created.code == 201
    served = await catalog.get(DEFAULT_TEMPLATE)
    health = json.loads((await api("GET", "/health")).body)
    assert health["templates"] == {"python": {"key": served.key, "rebuild_pending": False, "planned_key": served.key}}

    changed_guest_code()
    with pytest.raises(TemplateMissing, match="built from other inputs"):
        await find_built(DEFAULT_TEMPLATE, QemuBackend())  # what every create used to fail with
    catalog.start_watching(every_s=0.2)
    deadline = time.monotonic() + 60
    while True:
        health = json.loads((await api("GET", "/health")).body)
        if health["templates"]["python"]["rebuild_pending"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    entry = health["templates"]["python"]
    assert entry["rebuild_pending"] and entry["key"] == served.key and entry["planned_key"] not in (None, served.key)
    await asyncio.sleep(1)  # several more checks: the change is still logged once
    lines = [r.getMessage() for r in caplog.records if "sources changed" in r.getMessage()]
    assert lines == [CHANGED_LINE.format(key=served.key)]

    created = await api("POST", "/sessions")
    assert created.code == 201, created.body
    sid = json.loads(created.body)["id"]
    assert api.manager.get(sid).template.key == served.key
    run = json.loads((await api("POST", f"/sessions/{sid}/execute", body={"code": "6 * 7"})).body)
    assert run["results"][0]["text"] == "42"
    specs = json.loads((await api("GET", "/api/kernelspecs")).body)
    assert "python" in specs["kernelspecs"]


@pytest.mark.vm
async def test_a_build_keeps_the_build_a_server_uses_and_removes_it_once_released(built_template,
                                                                                     changed_guest_code):
    old = built_template.directory
    guard = Lease.take(old)  # whatever happens here, the suite's template survives
    assert guard is not None
    new = None
    try:
        async with TemplateCatalog() as serving_old:
            assert (await serving_old.get(DEFAULT_TEMPLATE)).directory == old
            changed_guest_code()
            out = io.StringIO()
            built = await build_template(DEFAULT_TEMPLATE, QemuBackend(), Progress(out))  # ~1 min under TCG
            new = built.directory
            assert new != old and new.is_dir() and old.is_dir()
            assert f"kept superseded build {old.name}" in out.getvalue(), out.getvalue()
            # the server keeps restoring from its build
            async with SessionManager(catalog=serving_old) as manager:
                session = await manager.create()
                assert session.template.directory == old
                assert (await session.execute("1 + 2")).results[0].text == "3"
            # a server on the new build: a --force rebuild may not replace it under that server, and a
            # build of the old sources does not delete it either...
            async with TemplateCatalog() as serving_new:
                assert (await serving_new.get(DEFAULT_TEMPLATE)).directory == new
                start = time.monotonic()
                with pytest.raises(TemplateBuildError, match="in use by a running vmcell server"):
                    await build_template(DEFAULT_TEMPLATE, QemuBackend(), Progress(io.StringIO()), force=True)
                assert time.monotonic() - start < 30 and (new / "meta.json").is_file()
                assert remove_superseded(DEFAULT_TEMPLATE, keep=old) == ([], [new])
        # ...until that server is gone
        assert remove_superseded(DEFAULT_TEMPLATE, keep=old) == ([new], [])
        assert not new.exists() and (old / "meta.json").is_file()
    finally:
        if guard is not None:
            guard.release()
        if new is not None and old.exists():
            shutil.rmtree(new, ignore_errors=True)  # leave the suite's template the only build
