"""The tools tree: a small cached Debian trixie tree holding image tooling newer than the host's
(ukify and the systemd-boot stub, e2fsprogs >= 1.47, mtools, dosfstools, fdisk), entered with chroot
in a private mount namespace, the way mkosi's ToolsTree works. Nothing is mounted on the host."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .cache import Cache, CacheKind, Entry, content_key
from .debian import Archive, ArchiveState, mmdebstrap_args
from .platform import HOST, Platform
from .run import BuildLog, run

TOOLS_PACKAGES = sorted([
    "systemd", "systemd-ukify", "systemd-boot-efi", "python3-pefile", "e2fsprogs", "dosfstools", "mtools",
    "fdisk", "util-linux", "erofs-utils", "zstd", "kmod", "binutils", "cpio", "apt",
    # the ruleset of an image for another architecture is checked by this (the same Debian) nft:
    # qemu-user does not translate netfilter's netlink sockets, so the image's own cannot run
    "nftables",
    # an emulated tree's packages are unpacked by this dpkg-deb, run natively (rootfs.py)
    "patchelf", "libeatmydata1",
])
TOOLS_RECIPE = 1  # bump when the way the tree is made changes
HOOK_TARGET = "/run/target"  # where ToolsTree.hook's script finds the tree being built


def tools_key(archive: Archive, snapshot: str | None) -> str:
    return content_key({"packages": TOOLS_PACKAGES, "suite": archive.suite, "recipe": TOOLS_RECIPE,
                        "snapshot": snapshot})


def from_archive(cache: Cache, kind: CacheKind, key_for: Callable[[str | None], str], state: ArchiveState,
                 make: Callable[[Path], dict[str, object]], log: BuildLog, rebuild: bool = False) -> Entry:
    """A cached tree made from the archive, for its current state as base trees are: the systemd-boot
    and UKI stub images boot with come from these, so a security update reaches the next build (with
    the state in the key, not only the packages' names). An older state's when Cache.reusable allows."""
    if not rebuild:
        older = cache.reusable(kind, key_for, state.snapshot, state.window)
        if older is not None:
            log.write(f"reusing the {kind} entry {older.key} made from the archive of {older.meta().get('snapshot')}\n")
            return older

    def made(tmp: Path) -> dict[str, object]:
        return {**make(tmp), "snapshot": state.snapshot}

    return cache.get_or_build(kind, key_for(state.snapshot), made, rebuild=rebuild)


def build_tools(cache: Cache, archive: Archive, log: BuildLog, rebuild: bool = False,
                state: ArchiveState | None = None) -> ToolsTree:
    def make(tmp: Path) -> dict[str, object]:
        tree = tmp / "tree"
        run([*mmdebstrap_args(cache.root / "debs"), f"--include={','.join(TOOLS_PACKAGES)}",
             # keep the package lists: they answer "does this package exist?" before a long build
             "--skip=cleanup/apt/lists",
             archive.suite, tree, *archive.sources()], log=log, what="mmdebstrap (tools tree)")
        return {"packages": TOOLS_PACKAGES}

    return ToolsTree(from_archive(cache, CacheKind.TOOLS, lambda s: tools_key(archive, s),
                                  state or ArchiveState.now(archive), make, log, rebuild))


@dataclass(frozen=True)
class ToolsTree:
    entry: Entry

    @property
    def root(self) -> Path:
        return self.entry.path / "tree"

    def hook(self, script: str) -> str:
        """A command for an mmdebstrap hook: the shell script run chrooted in the tools tree, natively,
        with the hook's tree ("$1") at HOOK_TARGET inside; nothing is mounted outside its namespace."""
        root, target = shlex.quote(str(self.root)), shlex.quote(f"{self.root}{HOOK_TARGET}")
        outer = (f'set -e; mount --bind {root} {root}; mkdir -p {target}; mount --bind "$0" {target}; '
                 f"exec chroot {root} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "
                 f"/bin/sh -ec {shlex.quote(script)}")
        return f'unshare --mount --propagation private sh -c {shlex.quote(outer)} "$1"'

    def run(self, cmd: Sequence[str | Path], *, binds: Sequence[Path], log: BuildLog, env: dict[str, str] | None = None,
            what: str | None = None, input: str | None = None) -> str:
        """Run cmd chrooted in the tools tree. Each path in binds is visible inside at the same path."""
        mounts = [f"mount --bind {shlex.quote(str(self.root))} {shlex.quote(str(self.root))}"]
        for b in binds:
            inner = shlex.quote(f"{self.root}{b}")
            mounts += [f"mkdir -p {inner}", f"mount --rbind {shlex.quote(str(b))} {inner}"]
        mounts += [f"mount -t proc proc {shlex.quote(str(self.root / 'proc'))}",
                   f"mount --rbind /dev {shlex.quote(str(self.root / 'dev'))}"]
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        script = "set -e\n" + "\n".join(mounts) + (
            f"\nexec chroot {shlex.quote(str(self.root))} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "
            f"{envs} {shlex.join(str(c) for c in cmd)}\n")
        return run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], log=log,
                   what=what or str(cmd[0]), input=input).stdout

    def available_packages(self, names: Sequence[str], log: BuildLog) -> set[str]:
        """Which of names the archive has, from the tree's package lists (no download)."""
        if not names:
            return set()
        found = set()
        out = self.run(["apt-cache", "policy", *names], binds=[], log=log, what="apt-cache policy")
        current = None
        for line in out.splitlines():
            if line and not line.startswith(" ") and line.endswith(":"):
                current = line[:-1]
            elif current and line.strip().startswith("Candidate:") and "(none)" not in line:
                found.add(current)
        return found


EFI_PACKAGES = ["systemd-boot-efi"]
EFI_RECIPE = 1


@dataclass(frozen=True)
class EfiBinaries:
    """systemd-boot and the UKI stub for a platform, as paths inside the tools tree's chroot (binds:
    what must be bound there for them to be seen)."""

    stub: str
    loader: str
    binds: tuple[Path, ...] = ()


def efi_binaries(cache: Cache, archive: Archive, plat: Platform, log: BuildLog, state: ArchiveState) -> EfiBinaries:
    """The host's come with the tools tree. Another architecture's are the same Debian package of that
    architecture, unpacked."""
    if plat == HOST:
        return EfiBinaries(plat.uki_stub, plat.systemd_boot)
    root = unpacked_packages(cache, archive, plat, EFI_PACKAGES, log, state, recipe=EFI_RECIPE)
    efi = root / plat.uki_stub.lstrip("/").rsplit("/", 1)[0]
    return EfiBinaries(f"{root}{plat.uki_stub}", f"{root}{plat.systemd_boot}", (efi,))


def unpacked_packages(cache: Cache, archive: Archive, plat: Platform, packages: Sequence[str], log: BuildLog,
                      state: ArchiveState, components: str = "main", recipe: int = EFI_RECIPE) -> Path:
    """Debian packages of an architecture unpacked into a cached tree, without their dependencies and
    without running anything of theirs (mmdebstrap's extract variant: nothing emulated)."""
    def make(tmp: Path) -> dict[str, object]:
        run([*mmdebstrap_args(cache.root / "debs", variant="extract", plat=plat), f"--include={','.join(packages)}",
             archive.suite, tmp / "tree", *archive.sources(components)], log=log,
            what=f"mmdebstrap ({', '.join(packages)}, {plat.arch})")
        return {"packages": list(packages), "arch": plat.arch}

    def key_for(snapshot: str | None) -> str:
        return content_key({"packages": list(packages), "arch": plat.arch, "suite": archive.suite,
                            "recipe": recipe, "components": components, "snapshot": snapshot})

    return from_archive(cache, CacheKind.EFI, key_for, state, make, log).path / "tree"
