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

from ..errors import InputError
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


# A tree made from the archive (base, tools, unpacked packages) is rebuilt whenever the archive moves
# (a security update lands every few days). Where the newest packages matter less than not
# rebuilding, e.g. a test suite on a warm cache, this many days of an older archive state are
# accepted; unset or 0: none. (Named for the base tree, the first it applied to.)
REUSE_ENV = "APPLIANCE_REUSE_BASE_DAYS"
MAX_REUSE_DAYS = 10_000


def reuse_window(env: dict[str, str] | None = None) -> float:
    """Seconds an older archive state's tree may be reused while the archive is reachable."""
    raw = (os.environ if env is None else env).get(REUSE_ENV, "").strip()
    try:
        days = float(raw or 0)
    except ValueError:
        days = -1
    if not 0 <= days < MAX_REUSE_DAYS:
        raise InputError(f"{REUSE_ENV}={raw[:40]!r}: expected a number of days from 0 up to "
                         f"{MAX_REUSE_DAYS:,} (unset: 0, only the archive's current state)")
    return days * 86400


@dataclass(frozen=True)
class ArchiveState:
    """Which cached trees made from the archive a build may take: the archive's current state's
    (snapshot; None: unreachable, then the newest of any), or one at most window seconds older."""

    snapshot: str | None
    window: float = 0.0

    @classmethod
    def now(cls, archive: Archive) -> ArchiveState:
        return cls(archive.snapshot(), reuse_window())


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
