"""The base root filesystem: Debian via mmdebstrap, wheels resolved and installed from the host, ext4.

pip never runs inside the guest tree (TLS fails in a chroot here): the host's pip installs the
pinned wheels for the guest's interpreter (cp311, manylinux x86_64) straight into the tree with
--target, and `mkfs.ext4 -d` turns the tree into an image without mounting anything.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ..config import ROOT_FS_LABEL, images_dir
from ..errors import HostSetupError
from ..progress import Progress
from .cache import atomic_output, build_lock, digest, run
from .recipe import RootfsRecipe

# Trimmed from the image: documentation and translations nobody reads inside a sandbox.
_DPKG_EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*"]

GUEST_ETC = {
    "etc/hostname": "vmcell\n",
    "etc/hosts": "127.0.0.1 localhost vmcell\n::1 localhost ip6-localhost ip6-loopback\n",
    "etc/machine-id": "",  # the session gets its own at creation (the `identity` op)
    "etc/resolv.conf": "",  # no network in the guest
}


def rootfs_key(recipe: RootfsRecipe, extra_debs: tuple[str, ...] = (), extra_wheels: tuple[str, ...] = ()) -> str:
    return digest("rootfs", recipe.suite, recipe.mirror, recipe.python_version, recipe.packages,
                  recipe.wheel_platforms, recipe.headroom_mib, recipe.wheels_lock.read_bytes(),
                  extra_debs, extra_wheels, Path(__file__).read_bytes())


def rootfs_path(recipe: RootfsRecipe, extra_debs=(), extra_wheels=()) -> Path:
    return images_dir() / f"rootfs-{rootfs_key(recipe, extra_debs, extra_wheels)}.ext4"


def ensure_rootfs(recipe: RootfsRecipe, progress: Progress, extra_debs: tuple[str, ...] = (),
                  extra_wheels: tuple[str, ...] = ()) -> Path:
    final = rootfs_path(recipe, extra_debs, extra_wheels)
    with build_lock(final.name):
        if final.exists():
            progress.note(f"root filesystem cached: {final.name}")
            return final
        if os.geteuid() != 0:
            raise HostSetupError("building the root filesystem runs mmdebstrap, which needs root here: "
                                 "run `vmcell template build` as root (or `sudo make setup`)")
        with tempfile.TemporaryDirectory(prefix="vmcell-rootfs-", dir=images_dir()) as tmp:
            tree = Path(tmp) / "tree"
            with progress.step(f"Debian {recipe.suite} base (mmdebstrap)"):
                run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(recipe.packages + extra_debs),
                     *[f"--dpkgopt=path-exclude={p}" for p in _DPKG_EXCLUDES],
                     recipe.suite, tree, recipe.mirror], "mmdebstrap")
            with progress.step("Python wheels for the guest (resolved on the host)"):
                install_wheels(recipe, tree, extra_wheels)
            for rel, text in GUEST_ETC.items():
                (tree / rel).unlink(missing_ok=True)
                (tree / rel).write_text(text)
            with progress.step("ext4 image (mkfs.ext4 -d)"), atomic_output(final) as scratch:
                make_ext4(tree, scratch, ROOT_FS_LABEL, recipe.headroom_mib, journal=False)
    return final


def install_wheels(recipe: RootfsRecipe, tree: Path, extra_wheels: tuple[str, ...]) -> None:
    site = tree / "usr" / "local" / "lib" / f"python{recipe.python_version}" / "dist-packages"
    pyver = recipe.python_version.replace(".", "")
    common = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              "--target", site, "--only-binary=:all:", "--python-version", recipe.python_version,
              "--implementation", "cp", "--abi", f"cp{pyver}",
              *[f"--platform={p}" for p in recipe.wheel_platforms]]
    run([*common, "--no-deps", "-r", recipe.wheels_lock], "installing the locked guest wheels")
    if extra_wheels:
        run([*common, *extra_wheels], "installing the template's extra wheels")
    # pip --target puts console scripts under the target; the guest finds them on PATH here. Their
    # shebang names the host's interpreter (the one that ran pip): the guest's is /usr/bin/python3.
    scripts = site / "bin"
    if scripts.is_dir():
        for script in scripts.iterdir():
            target = tree / "usr" / "local" / "bin" / script.name
            script.rename(target)
            data = target.read_bytes()
            if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
                target.write_bytes(b"#!/usr/bin/python3" + data[data.index(b"\n"):])
        scripts.rmdir()
    # PEP 668: Debian marks its Python externally managed, so `pip install` in a cell would refuse.
    # A session's VM is disposable and pip installs into its own writable layer: let it.
    for marker in (tree / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
        marker.unlink()


def make_ext4(tree: Path | None, image: Path, label: str, headroom_mib: int, journal: bool,
              size_mib: int | None = None) -> None:
    """An ext4 image from a directory tree (or empty), built without mounting."""
    if size_mib is None:
        used, files = 0, 0
        for root, dirs, names in os.walk(tree):
            files += len(dirs) + len(names)
            used += sum(os.lstat(os.path.join(root, n)).st_size for n in names)
        size_mib = int(used * 1.15 / 2**20) + headroom_mib
        inodes = ["-N", str(int(files * 1.2) + 4096)]
    else:
        inodes = []
    cmd = ["mkfs.ext4", "-q", "-F", "-L", label, "-m", "0", "-E", "root_owner=0:0", *inodes,
           "-O", "has_journal" if journal else "^has_journal"]
    if tree is not None:
        cmd += ["-d", tree]
    run([*cmd, image, f"{size_mib}M"], f"mkfs.ext4 for {image.name}")
