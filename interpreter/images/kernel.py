"""Guest kernel and initramfs from Debian's packages, fetched with `apt-get download`, never installed."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..config import GUEST_PACKAGE_DIR, downloads_dir, images_dir
from ..errors import ImageBuildError
from . import cpio
from .cache import atomic_output, build_lock, digest, run
from .recipe import DebianPackage, KernelRecipe, Recipe

_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


@dataclass(frozen=True)
class KernelArtifact:
    key: str
    directory: Path

    @property
    def vmlinuz(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def modules_dir(self) -> Path:
        return self.directory / "modules"

    @property
    def modules_order(self) -> list[str]:
        return (self.directory / "modules.list").read_text().split()


def kernel_key(recipe: KernelRecipe) -> str:
    return digest("kernel", recipe.deb.spec, recipe.modules)


def initramfs_key(recipe: Recipe) -> str:
    return digest("initramfs", kernel_key(recipe.kernel), recipe.busybox.spec,
                  recipe.initramfs_init, GUEST_PACKAGE_DIR)


def kernel_path(recipe: KernelRecipe) -> KernelArtifact:
    key = kernel_key(recipe)
    return KernelArtifact(key, images_dir() / f"kernel-{key}")


def initramfs_path(recipe: Recipe) -> Path:
    return images_dir() / f"initramfs-{initramfs_key(recipe)}.cpio"


def fetch_deb(pkg: DebianPackage) -> Path:
    """`apt-get download` of an exact version into the download cache."""
    dest = downloads_dir()
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{pkg.package}_*{pkg.version.split(':')[-1]}_*.deb"
    found = sorted(dest.glob(pattern))
    if not found:
        try:
            run(["apt-get", "download", pkg.spec], f"downloading {pkg.spec}", cwd=dest)
        except ImageBuildError as exc:
            raise ImageBuildError(f"{exc}\nhint: run `apt-get update`; if Debian no longer serves this version, "
                                  f"pin a current one in kernel-images/recipe.toml (`apt-cache policy {pkg.package}`)") from None
        found = sorted(dest.glob(pattern))
    if not found:
        raise ImageBuildError(f"apt-get download left no {pattern} in {dest}")
    return found[-1]


def module_dependencies(ko_file: Path) -> list[str]:
    """The `depends=` field of a module's .modinfo, read straight from the .ko (no kmod needed)."""
    match = _DEPENDS.search(ko_file.read_bytes())
    return [d for d in match.group(1).decode().split(",") if d] if match else []


def resolve_module_order(wanted: tuple[str, ...], find) -> list[str]:
    """Dependency-first load order; `find(name)` returns the .ko path of a module."""
    order: list[str] = []

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in trail:
            raise ValueError(f"module dependency cycle: {' -> '.join(trail + (name,))}")
        for dep in module_dependencies(find(name)):
            visit(dep, trail + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def ensure_kernel(recipe: KernelRecipe) -> KernelArtifact:
    artifact = kernel_path(recipe)
    with build_lock(f"kernel-{artifact.key}"):
        if artifact.vmlinuz.exists():
            return artifact
        deb = fetch_deb(recipe.deb)
        with tempfile.TemporaryDirectory(prefix="vmcell-kernel-") as tmp, atomic_output(artifact.directory) as out:
            unpacked = Path(tmp)
            run(["dpkg-deb", "-x", deb, unpacked], f"unpacking {deb.name}")
            (vmlinuz,) = (unpacked / "boot").glob("vmlinuz-*")
            index = {p.stem: p for p in (unpacked / "lib" / "modules").rglob("*.ko")}

            def find(name: str) -> Path:
                try:
                    return index[name]
                except KeyError:
                    raise ImageBuildError(f"module {name}.ko is not in {deb.name}: fix the module list "
                                          "in kernel-images/recipe.toml") from None

            order = resolve_module_order(recipe.modules, find)
            (out / "modules").mkdir(parents=True)
            vmlinuz.rename(out / "vmlinuz")
            for name in order:
                find(name).rename(out / "modules" / f"{name}.ko")
            (out / "modules.list").write_text("\n".join(order) + "\n")
            (out / "version").write_text(vmlinuz.name.removeprefix("vmlinuz-") + "\n")
    return artifact


def ensure_initramfs(recipe: Recipe) -> Path:
    """busybox + /init + the kernel modules + the guest package, as one uncompressed newc archive
    (uncompressed: decompressing under TCG costs more boot time than reading a few MB)."""
    kernel = ensure_kernel(recipe.kernel)
    final = initramfs_path(recipe)
    with build_lock(final.name):
        if final.exists():
            return final
        deb = fetch_deb(recipe.busybox)
        with tempfile.TemporaryDirectory(prefix="vmcell-busybox-") as tmp:
            run(["dpkg-deb", "-x", deb, tmp], f"unpacking {deb.name}")
            busybox = (Path(tmp) / "bin" / "busybox").read_bytes()
        entries = [cpio.directory(d) for d in ("bin", "dev", "lib", "lib/modules", "proc", "sys",
                                               "vmcell", "vmcell/vmcell_guest")]
        entries += [
            cpio.char_device("dev/console", 5, 1),
            cpio.regular("bin/busybox", busybox, 0o755),
            cpio.regular("init", recipe.initramfs_init.read_bytes(), 0o755),
            cpio.regular("modules.list", "\n".join(kernel.modules_order).encode() + b"\n"),
        ]
        entries += [cpio.regular(f"lib/modules/{name}.ko", (kernel.modules_dir / f"{name}.ko").read_bytes())
                    for name in kernel.modules_order]
        entries += [cpio.regular(f"vmcell/vmcell_guest/{p.name}", p.read_bytes())
                    for p in sorted(GUEST_PACKAGE_DIR.glob("*.py"))]
        with atomic_output(final) as scratch:
            with open(scratch, "wb") as out:
                cpio.write_newc(out, entries)
    return final
