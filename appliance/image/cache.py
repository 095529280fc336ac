"""A cache of built trees keyed by what they contain.

Each entry is a directory CACHE/KIND-KEY/ created under a temporary name and renamed into place when
complete, so a killed build never leaves a half-built entry that looks finished. A lock file per key
keeps two builds from making the same entry at once."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from .run import run

CACHE_ENV = "APPLIANCE_CACHE"


class CacheKind(StrEnum):
    """What a cache entry holds (its directory is KIND-KEY)."""

    TOOLS = "tools"  # the trixie tools tree (ukify, mkfs, sfdisk)
    BASE = "base"  # a base root tree
    ESP = "esp"  # an ESP image with its UKI
    GOTREE = "gotree"  # the Go toolchain tree
    NETSTACK = "netstack"  # the compiled appliance-netstack
    EFI = "efi"  # systemd-boot and its UKI stub for an architecture other than the host's
COMPLETE = "complete.json"
# an entry's directory, and a build's temporary one (see get_or_build)
_ENTRY_RE = re.compile(r"(?P<kind>[a-z]+)-(?P<key>[0-9a-z]+)")
_TMP_RE = re.compile(r"\.(?P<kind>[a-z]+)-(?P<key>[0-9a-z]+)\.tmp-(?P<pid>[0-9]+)")


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "appliance"


def content_key(inputs: Any) -> str:
    """A short stable hash of JSON-able inputs: the identity of a cache entry."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    path: Path

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    def meta(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / COMPLETE).read_text())
        return data


class Cache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    def entry(self, kind: str, key: str) -> Entry:
        return Entry(kind, key, self.root / f"{kind}-{key}")

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{name}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get_or_build(self, kind: str, key: str, build: Callable[[Path], dict[str, Any]],
                     rebuild: bool = False) -> Entry:
        """Return the entry, building it with build(tmpdir) -> metadata when missing (or rebuild)."""
        entry = self.entry(kind, key)
        with self._lock(f"{kind}-{key}"):
            if entry.complete and not rebuild:
                os.utime(entry.path / COMPLETE)  # last use, for `cache clean --older-than`
                return entry
            tmp = self.root / f".{kind}-{key}.tmp-{os.getpid()}"
            _remove(tmp)
            tmp.mkdir(parents=True)
            try:
                meta = build(tmp)
                (tmp / COMPLETE).write_text(json.dumps({"kind": kind, "key": key, "created": int(time.time()),
                                                        **meta}, indent=1, sort_keys=True) + "\n")
                if entry.path.exists():
                    _remove(entry.path)
                os.rename(tmp, entry.path)
            except BaseException:
                _remove(tmp)
                raise
        return entry

    def entries(self) -> list[Entry]:
        """The entries this cache made: KIND-KEY directories whose completion marker names that kind
        and key. Nothing else in the directory is taken for one (`cache clean --cache ~` must not
        delete a directory merely because its name has a '-')."""
        if not self.root.is_dir():
            return []
        found = []
        for p in sorted(self.root.iterdir()):
            m = _ENTRY_RE.fullmatch(p.name)
            if m and p.is_dir() and not p.is_symlink():
                e = Entry(m["kind"], m["key"], p)
                if _is_ours(e):
                    found.append(e)
        return found

    def newest(self, kind: str, key_for: Callable[[str], str], max_age: float | None = None) -> Entry | None:
        """The newest complete entry of kind made from any state of the archive (at most max_age
        seconds old): one counts only if key_for(the snapshot it was made from) is its key, so an
        entry of another recipe or other inputs is never taken."""
        now = time.time()
        found = []
        for e in self.entries():
            if e.kind != kind or not e.complete:
                continue
            meta = e.meta()
            snapshot, created = meta.get("snapshot"), float(meta.get("created", 0))
            if not isinstance(snapshot, str) or key_for(snapshot) != e.key:
                continue
            if max_age is None or now - created <= max_age:
                found.append((created, e))
        return max(found, key=lambda f: f[0])[1] if found else None

    def reusable(self, kind: str, key_for: Callable[[str], str], snapshot: str | None, window: float) -> Entry | None:
        """The entry of an older archive state a build takes instead of the current state's (snapshot;
        None: the archive is unreachable). Offline: the newest of any age. Online: none if the current
        state's own entry is complete (the caller takes it), else the newest at most window seconds old."""
        if snapshot is not None and (window <= 0 or self.entry(kind, key_for(snapshot)).complete):
            return None
        return self.newest(kind, key_for, None if snapshot is None else window)

    def clean(self, keep: Callable[[Entry], bool] = lambda e: False) -> list[Entry]:
        """Remove entries (and leftovers of killed builds) that keep() does not want."""
        removed = []
        for e in self.entries():
            if not keep(e):
                with self._lock(e.path.name):
                    _remove(e.path)
                removed.append(e)
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = _TMP_RE.fullmatch(p.name)
                if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m["pid"])):
                    _remove(p)
        return removed


def _is_ours(e: Entry) -> bool:
    try:
        meta = e.meta()
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("kind") == e.kind and meta.get("key") == e.key


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != 0


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        unmount_below(path)
        shutil.rmtree(path)


def unmount_below(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> None:
    """Detach what is mounted under path: a build killed mid-way (mmdebstrap's /proc, /sys and /dev
    in the tree) would otherwise stop rmtree at a read-only file system, or let it into one."""
    prefix = f"{os.path.realpath(path)}/"
    points = [line.split()[4] for line in mountinfo.read_text().splitlines()]
    # mountinfo escapes space, tab, newline and backslash in octal
    points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), p) for p in points]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        run(["umount", "--lazy", point], check=False)


def dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while we walk
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total
