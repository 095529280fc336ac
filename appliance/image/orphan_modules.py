"""Kernel modules left without a module they depend on, after whole subtrees were left out of an image.

Such a module cannot load (the kernel refuses it for its unknown symbols), yet udev would try it
for every device its aliases match, at every boot, and log the failure. This removes each one, then
those that depended on it, until every module left has all its dependencies. What a module depends on
is what the kernel's build wrote into it (the `depends=` of its .modinfo, which modinfo shows): it
does not need depmod's index, which is stale until depmod runs again after this.

Standard library only: run as a script (`python3 orphan_modules.py MODULES_DIR`) by the tools tree's
python3 inside an mmdebstrap hook, natively whatever the tree's architecture; prints one line per
module it removes, with the modules it missed. (A change to what it removes changes base trees: bump
rootfs.BASE_RECIPE.)"""

from __future__ import annotations

import lzma
import os
import re
import sys
from pathlib import Path

SUFFIXES = (".ko", ".ko.xz")
_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)")


def module_name(path: Path) -> str:
    """The kernel's name for a module file: its file name, dashes read as underscores."""
    name = path.name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)].replace("-", "_")
    raise ValueError(f"{path}: not a kernel module file ({' or '.join(SUFFIXES)})")


def depends(path: Path) -> list[str]:
    """The modules this one needs loaded first, as its .modinfo names them."""
    data = lzma.decompress(path.read_bytes()) if path.name.endswith(".xz") else path.read_bytes()
    m = _DEPENDS.search(data)
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def module_files(root: Path) -> dict[str, Path]:
    """Every module under root (one kernel's /usr/lib/modules/VERSION), by name. A compressed form
    this cannot read is an error, not a module silently taken for one without dependencies."""
    found: dict[str, Path] = {}
    for directory, _, names in os.walk(root):
        for name in names:
            if ".ko." in name and not name.endswith(SUFFIXES):
                raise ValueError(f"{Path(directory) / name}: compressed in a form this does not read")
            if name.endswith(SUFFIXES):
                path = Path(directory) / name
                found[module_name(path)] = path
    return found


def orphans(modules: dict[str, list[str]]) -> dict[str, list[str]]:
    """name -> the dependencies it misses, for every module that cannot load because one of its
    dependencies is absent or is itself such a module (to the fixed point)."""
    missing: dict[str, list[str]] = {}
    changed = True
    while changed:
        changed = False
        for name, deps in modules.items():
            if name in missing:
                continue
            gone = [d for d in deps if d not in modules or d in missing]
            if gone:
                missing[name] = gone
                changed = True
    return missing


def prune(root: Path) -> dict[str, list[str]]:
    """Remove the orphans under root; returns them as orphans() does."""
    files = module_files(root)
    gone = orphans({name: depends(path) for name, path in files.items()})
    for name in gone:
        files[name].unlink()
    return gone


def main(argv: list[str]) -> int:
    for version in sorted(Path(argv[1]).iterdir()):
        for name, deps in sorted(prune(version).items()):
            print(f"{version.name}: removed {name}: it needs {', '.join(deps)}, which the image leaves out")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
