"""Guest images: kernel + initramfs + base root filesystem, built from kernel-images/ and cached."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..progress import Progress
from .cache import digest
from .kernel import ensure_initramfs, ensure_kernel, initramfs_key, initramfs_path, kernel_path
from .recipe import Recipe, load_recipe
from .rootfs import ensure_rootfs, make_ext4, rootfs_path


@dataclass(frozen=True)
class GuestImages:
    vmlinuz: Path
    initramfs: Path
    rootfs: Path
    cmdline: str

    @property
    def key(self) -> str:
        return digest("images", self.vmlinuz.parent.name, self.initramfs.name, self.rootfs.name, self.cmdline)

    def missing(self) -> list[Path]:
        return [p for p in (self.vmlinuz, self.initramfs, self.rootfs) if not p.exists()]


def planned_images(extra_debs: tuple[str, ...] = (), extra_wheels: tuple[str, ...] = (),
                   recipe: Recipe | None = None) -> GuestImages:
    """Where the images for these inputs live (built or not): cheap, no building."""
    recipe = recipe or load_recipe()
    return GuestImages(
        vmlinuz=kernel_path(recipe.kernel).vmlinuz,
        initramfs=initramfs_path(recipe),
        rootfs=rootfs_path(recipe.rootfs, extra_debs, extra_wheels),
        cmdline=recipe.kernel.cmdline,
    )


def ensure_images(progress: Progress, extra_debs: tuple[str, ...] = (),
                  extra_wheels: tuple[str, ...] = ()) -> GuestImages:
    recipe = load_recipe()
    with progress.step(f"guest kernel {recipe.kernel.deb.package} + initramfs"):
        ensure_kernel(recipe.kernel)
        ensure_initramfs(recipe)
    ensure_rootfs(recipe.rootfs, progress, extra_debs, extra_wheels)
    images = planned_images(extra_debs, extra_wheels, recipe)
    assert not images.missing(), images.missing()
    return images


__all__ = ["GuestImages", "planned_images", "ensure_images", "make_ext4", "initramfs_key"]
