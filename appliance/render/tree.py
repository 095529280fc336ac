"""ConfigTree: the files an image carries, as data (path -> bytes, mode), independent of any disk.

Owners are always root:root in the image. Entries marked secret (private and preshared keys) are
kept in memory and only written when the caller asks for them (the image build does; `render -o`
does not by default)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

MANIFEST = ".appliance-render.json"


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the image root, e.g. "etc/nftables.conf"
    kind: Literal["file", "dir", "symlink"] = "file"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""  # symlinks only
    secret: bool = False

    def __repr__(self) -> str:
        body = "<secret>" if self.secret else f"{len(self.data)} bytes"
        return f"Entry({self.path!r}, {self.kind}, {body}, mode={self.mode:04o})"

    def manifest_row(self) -> dict[str, object]:
        row: dict[str, object] = {"path": self.path, "kind": self.kind, "mode": f"{self.mode:04o}"}
        if self.kind == "symlink":
            row["target"] = self.target
        elif self.kind == "file":
            row["size"] = len(self.data)
            if self.secret:
                row["secret"] = True
            else:
                row["sha256"] = hashlib.sha256(self.data).hexdigest()
        return row


def _check_path(path: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or not p.parts or str(p) != path:
        raise ValueError(f"config tree paths are relative and normalised, got {path!r}")
    return path


@dataclass
class ConfigTree:
    entries: dict[str, Entry] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        _check_path(entry.path)
        if entry.path in self.entries:
            raise ValueError(f"{entry.path} is rendered twice")
        self.entries[entry.path] = entry

    def file(self, path: str, data: str | bytes, mode: int = 0o644, secret: bool = False) -> None:
        self.add(Entry(path, "file", data.encode() if isinstance(data, str) else data, mode, secret=secret))

    def dir(self, path: str, mode: int = 0o755) -> None:
        self.add(Entry(path, "dir", mode=mode))

    def symlink(self, path: str, target: str) -> None:
        self.add(Entry(path, "symlink", mode=0o777, target=target))

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self.entries.values(), key=lambda e: e.path))

    def __getitem__(self, path: str) -> Entry:
        return self.entries[path]

    def __contains__(self, path: object) -> bool:
        return path in self.entries

    def text(self, path: str) -> str:
        return self.entries[path].data.decode()

    def manifest(self) -> list[dict[str, object]]:
        return [e.manifest_row() for e in self]

    def digest(self) -> str:
        """Identity of the tree's content, secrets included (hashed, never shown)."""
        h = hashlib.sha256()
        for e in self:
            h.update(json.dumps(e.manifest_row(), sort_keys=True).encode())
            if e.secret:
                h.update(hashlib.sha256(e.data).digest())
        return h.hexdigest()

    def write(self, dest: Path, include_secrets: bool = False, mtime: int | None = None) -> None:
        """Write the tree to dest, replacing an earlier render there. The new tree is assembled in a
        temporary sibling directory and renamed into place, so dest is never half-written."""
        dest = Path(os.path.abspath(dest))
        _require_replaceable(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
        try:
            self.write_into(tmp, include_secrets=include_secrets, mtime=mtime)
            rows = [r for r in self.manifest() if include_secrets or not r.get("secret")]
            (tmp / MANIFEST).write_text(json.dumps(rows, indent=1) + "\n")
            os.chmod(tmp, 0o755)
            old = None
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.rename(dest, old)
            os.rename(tmp, dest)
            if old:
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def write_into(self, root: Path, include_secrets: bool = False, mtime: int | None = None) -> None:
        """Write entries below root (an existing directory, e.g. an image root tree)."""
        for e in self:
            if e.secret and not include_secrets:
                continue
            target = root / e.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if e.kind == "dir":
                target.mkdir(exist_ok=True)
                os.chmod(target, e.mode)
            elif e.kind == "symlink":
                if target.is_symlink() or target.exists():
                    target.unlink()
                os.symlink(e.target, target)
            else:
                # unlink first: the tree may be a hardlinked copy of a cached base, which must not change
                if target.is_symlink() or target.exists():
                    target.unlink()
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(e.data)
                os.chmod(target, e.mode)
            if mtime is not None:
                os.utime(target, (mtime, mtime), follow_symlinks=False)


def _require_replaceable(dest: Path) -> None:
    """dest may be replaced only if it is absent, empty, or exactly an earlier render: its marker lists
    every entry in it. Never the directory we are in (or one above it)."""
    cwd = Path(os.path.abspath(os.getcwd()))
    if dest == cwd or dest in cwd.parents:
        raise FileExistsError(f"{dest} is the current directory (or holds it): render into another directory")
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise FileExistsError(f"{dest} exists and is not a directory: refusing to replace it")
    if not dest.exists() or not any(dest.iterdir()):
        return
    try:
        rows = json.loads((dest / MANIFEST).read_text())
        listed = {str(r["path"]) for r in rows} | {MANIFEST}
        listed |= {str(parent) for path in list(listed) for parent in PurePosixPath(path).parents}
    except (OSError, ValueError, TypeError, KeyError):
        raise FileExistsError(f"{dest} exists and is not an earlier render: refusing to replace it") from None
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in [*dirnames, *filenames]:
            rel = os.path.relpath(os.path.join(dirpath, name), dest)
            if rel not in listed:
                raise FileExistsError(f"{dest} holds {rel}, which no earlier render wrote: refusing to replace it")
