"""The secret store: per-appliance key files outside git, created on first use.

Layout: STORE/NAME/private.key (the appliance's WireGuard key) and STORE/NAME/psk/PEER.key.
Directories are 0700 and files 0600; a file is written to a temporary name and renamed, so an
interrupted run never leaves a half-written key. Values are never logged or printed by this module.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .keys import generate_preshared_key, generate_private_key, public_key

DEFAULT_STORE = Path("secrets")
STORE_ENV = "APPLIANCE_SECRETS"


class SecretStoreError(Exception):
    pass


def default_store_path() -> Path:
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


@dataclass(frozen=True)
class ApplianceKeys:
    """What rendering needs: the private key (goes only into root-only files) and peers' PSKs."""

    private_key: str
    preshared_keys: dict[str, str]  # peer name -> key

    @property
    def public_key(self) -> str:
        return public_key(self.private_key)

    def __repr__(self) -> str:  # keep secrets out of tracebacks and debug logs
        return f"ApplianceKeys(public_key={self.public_key!r}, preshared_keys=<{len(self.preshared_keys)} redacted>)"


class SecretStore:
    def __init__(self, root: Path | None = None, create: bool = True, age_identity: Path | None = None):
        self.root = Path(root) if root is not None else default_store_path()
        self.create = create
        self.age_identity = age_identity

    def _dir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        if self.create:
            for p in [self.root, *[self.root.joinpath(*parts[: i + 1]) for i in range(len(parts))]]:
                p.mkdir(mode=0o700, exist_ok=True)
                _require_private_dir(p)
        return path

    def _get_or_create(self, path: Path, make: Callable[[], str]) -> str:
        encrypted = path.with_name(path.name + ".age")
        if not path.exists() and encrypted.exists():  # committed ciphertext: decrypt in memory only
            from .crypt import AgeError, decrypt_file

            try:
                return decrypt_file(encrypted, self.age_identity)
            except AgeError as e:
                raise SecretStoreError(str(e)) from None
        if path.exists():
            _require_private_file(path)
            value = path.read_text().strip()
            if not value:
                raise SecretStoreError(f"{path} is empty: delete it to generate a new key")
            return value
        if not self.create:
            raise SecretStoreError(f"{path} does not exist (run `appliance keys NAME` to create it)")
        value = make()
        _write_private(path, value + "\n")
        return value

    def private_key(self, name: str) -> str:
        return self._get_or_create(self._dir(name) / "private.key", generate_private_key)

    def preshared_key(self, name: str, peer: str) -> str:
        return self._get_or_create(self._dir(name, "psk") / f"{peer}.key", generate_preshared_key)

    def key_files(self, name: str) -> list[Path]:
        base = self.root / name
        return sorted(p for p in base.rglob("*.key")) if base.is_dir() else []

    def appliance_keys(self, name: str, psk_peers: list[str]) -> ApplianceKeys:
        return ApplianceKeys(self.private_key(name), {p: self.preshared_key(name, p) for p in sorted(psk_peers)})


def _write_private(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _require_private_dir(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecretStoreError(f"{path} is accessible by others (mode {mode:04o}): run chmod 700 {path}")


def _require_private_file(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecretStoreError(f"{path} is readable by others (mode {mode:04o}): run chmod 600 {path}")
