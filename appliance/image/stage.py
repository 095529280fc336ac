"""The staged root tree of one build: a hardlinked copy of the cached base with the profile's
configuration written over it. Writing unlinks before it writes, so the base is never modified; the
copy costs a fraction of a second and holds the private key, so it is removed after the build."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..render.tree import ConfigTree
from .bytecode import compile_bytecode
from .disk import DPKG_DB
from .rootfs import BaseTree, clamp_mtimes
from .run import BuildLog, run
from .tools import ToolsTree


def stage_tree(base: BaseTree, config: ConfigTree, dest: Path, sde: int, tools: ToolsTree, log: BuildLog,
               emulator_env: dict[str, str]) -> Path:
    if dest.exists():
        remove_tree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-al", base.tree, dest], log=log, what="cp -al (stage the base tree)")
    # kernel and initramfs boot from the UKI on the ESP; copies in the root would only add size
    for pattern in ("boot/vmlinuz-*", "boot/initrd.img-*", "vmlinuz*", "initrd.img*"):
        for p in dest.glob(pattern):
            p.unlink()
    config.write_into(dest, include_secrets=True, mtime=sde)
    # the profile's system users (sysusers.d) exist in the image: systemd-sysusers does not run at
    # boot on an up-to-date /usr (ConditionNeedsUpdate=); it writes new files, the base keeps its own
    run(["chroot", dest, "systemd-sysusers"], log=log, env={"SOURCE_DATE_EPOCH": str(sde), **emulator_env},
        what="systemd-sysusers")
    # the shipped dataplane code: compiled at every boot otherwise (a read-only root has no __pycache__)
    compile_bytecode(tools, dest, ["usr/lib/appliance/python"], log, "dataplane code")
    clamp_mtimes(dest, sde)  # directories we wrote into got a new mtime
    return dest


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def split_var(tree: Path, dest: Path, sde: int, log: BuildLog) -> Path:
    """The data partition's content at dest: a hardlinked copy of the tree's /var without dpkg's
    database, which the root gets a copy of under DPKG_DB. The root file system leaves out the rest
    of /var (assemble.build_root_fs); the tree itself keeps it, as checked."""
    run(["cp", "-al", tree / "var", dest], log=log, what="cp -al (the data partition's /var)")
    shutil.rmtree(dest / "lib/dpkg")
    db = tree / DPKG_DB
    db.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    run(["cp", "-al", tree / "var/lib/dpkg", db], log=log, what="cp -al (dpkg's database into the root)")
    for changed in (db.parent, dest / "lib"):  # as clamp_mtimes left them
        os.utime(changed, (sde, sde))
    return dest


def tree_bytes(path: Path) -> int:
    """Bytes the tree takes in a file system (4 KiB blocks), counting hardlinked files once."""
    seen: set[int] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            total += (st.st_size + 4095) // 4096 * 4096 + 256  # + inode
    return total
