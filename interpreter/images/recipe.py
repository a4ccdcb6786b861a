"""kernel-images/recipe.toml as typed data."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..config import KERNEL_IMAGES_DIR
from ..errors import ImageBuildError


@dataclass(frozen=True)
class DebianPackage:
    package: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.package}={self.version}"


@dataclass(frozen=True)
class KernelRecipe:
    deb: DebianPackage
    modules: tuple[str, ...]
    cmdline: str


@dataclass(frozen=True)
class RootfsRecipe:
    suite: str
    mirror: str
    python_version: str
    packages: tuple[str, ...]
    wheels_lock: Path
    wheel_platforms: tuple[str, ...]
    headroom_mib: int


@dataclass(frozen=True)
class Recipe:
    kernel: KernelRecipe
    busybox: DebianPackage
    rootfs: RootfsRecipe
    initramfs_init: Path


def load_recipe(directory: Path = KERNEL_IMAGES_DIR) -> Recipe:
    path = directory / "recipe.toml"
    try:
        raw = tomllib.loads(path.read_text())
        k, b, r = raw["kernel"], raw["busybox"], raw["rootfs"]
        return Recipe(
            kernel=KernelRecipe(DebianPackage(k["package"], k["version"]), tuple(k["modules"]), k["cmdline"]),
            busybox=DebianPackage(b["package"], b["version"]),
            rootfs=RootfsRecipe(
                suite=r["suite"], mirror=r["mirror"], python_version=r["python_version"],
                packages=tuple(r["packages"]), wheels_lock=directory / r["wheels_lock"],
                wheel_platforms=tuple(r["wheel_platforms"]), headroom_mib=int(r["headroom_mib"]),
            ),
            initramfs_init=directory / "initramfs" / "init",
        )
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ImageBuildError(f"cannot read the image recipe {path}: {exc!r}") from None
