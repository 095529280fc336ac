"""The Debian archive the images come from: sources, the archive's current snapshot, mmdebstrap options.

A tree built from trixie is reused only while trixie's archive is unchanged: the snapshot identity
is the Date of each suite's InRelease. Without network the newest cached tree is reused instead."""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .platform import HOST, Platform

SUITE = "trixie"
PYTHON = "3.13"  # the suite's python3; an emulated tree's bytecode is made by the tools tree's (rootfs.py)
MIRROR_ENV = "APPLIANCE_MIRROR"
SECURITY_MIRROR_ENV = "APPLIANCE_SECURITY_MIRROR"


@dataclass(frozen=True)
class Archive:
    mirror: str
    security: str
    suite: str = SUITE

    @classmethod
    def from_env(cls) -> Archive:
        return cls(os.environ.get(MIRROR_ENV, "http://deb.debian.org/debian"),
                   os.environ.get(SECURITY_MIRROR_ENV, "http://deb.debian.org/debian-security"))

    def sources(self, components: str = "main") -> list[str]:
        return [f"deb {self.mirror} {self.suite} {components}",
                f"deb {self.mirror} {self.suite}-updates {components}",
                f"deb {self.security} {self.suite}-security {components}"]

    def _inrelease_urls(self) -> list[str]:
        return [f"{self.mirror}/dists/{self.suite}/InRelease",
                f"{self.mirror}/dists/{self.suite}-updates/InRelease",
                f"{self.security}/dists/{self.suite}-security/InRelease"]

    def snapshot(self, timeout: float = 10.0) -> str | None:
        """Identity of the archive's current state, or None when the archive cannot be reached."""
        dates = []
        for url in self._inrelease_urls():
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    head = r.read(4096).decode("utf-8", "replace")
            except (urllib.error.URLError, OSError, TimeoutError):
                return None
            m = re.search(r"^Date: (.+)$", head, re.M)
            dates.append(m.group(1).strip() if m else "?")
        return " | ".join(dates)


DPKG_EXCLUDES = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    # the hardware database names USB/PCI vendors for humans; an appliance's udev does not need it
    "path-exclude=/usr/lib/udev/hwdb.d/*",
]


def dpkg_excludes(plat: Platform) -> list[str]:
    # glibc's converters for legacy charsets; UTF-8 and ASCII are built in
    return [*DPKG_EXCLUDES, f"path-exclude=/usr/lib/{plat.multiarch}/gconv/*"]


def mmdebstrap_args(debs: Path, *, variant: str = "apt", plat: Platform = HOST) -> list[str]:
    """Options every tree shares: root mode, no translations, a shared .deb cache (files are named by
    version, so sharing them between trees is safe)."""
    debs.mkdir(parents=True, exist_ok=True)
    return [
        "mmdebstrap", "--mode=root", f"--variant={variant}", f"--architectures={plat.arch}",
        '--aptopt=Acquire::Languages "none"',
        "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
        f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
    ]
