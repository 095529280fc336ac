"""NAME.tested.json: a passing `appliance test` of a profile in this checkout, and what it booted.

An image counts as tested when its profile, the appliance code that built it and its Debian
packages are exactly those of the lab variant a passing `appliance test` booted (the lab's own
changes, its keys and management NIC, aside). `appliance update` sends only tested images unless
told --untested; a build copies a matching record into its manifest ("tested")."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write

PACKAGE = Path(__file__).resolve().parents[1]  # appliance/
CODE_SUFFIXES = {".py", ".j2", ".go", ".mod", ".sum"}


@functools.cache
def code_digest(root: Path = PACKAGE) -> str:
    """A digest of the appliance code that builds images (its package: Python, templates, Go)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts):
        h.update(f"{path.relative_to(root)}\0{path.stat().st_size}\0".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def packages_digest(packages: dict[str, str]) -> str:
    """What the root's packages are (name=version), not where they were cached."""
    return hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(packages.items())).encode()).hexdigest()


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.tested.json"


def _key(name: str, profile_digest: str, packages: dict[str, str]) -> dict[str, str]:
    return {"name": name, "profile_digest": profile_digest, "code_digest": code_digest(),
            "packages_digest": packages_digest(packages)}


def write_record(out_dir: Path, name: str, profile_digest: str, packages: dict[str, str],
                 result: dict[str, Any]) -> Path:
    """Record that the lab variant of this profile, with these packages, passed (result: the test's summary)."""
    path = record_path(out_dir, name)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**_key(name, profile_digest, packages), "tested_at": int(time.time()), "result": result}
    atomic_write(path, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


def matching_record(out_dir: Path, name: str, profile_digest: str, packages: dict[str, str]) -> dict[str, Any] | None:
    """The record of a passing test of exactly this profile, code and packages, or None."""
    try:
        record = json.loads(record_path(out_dir, name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not profile_digest:
        return None
    want = _key(name, profile_digest, packages)
    return record if all(record.get(k) == v for k, v in want.items()) else None
