"""The secret store: per-appliance key files outside git, created on first use.

Layout: STORE/NAME/private.key (the appliance's WireGuard key), STORE/NAME/psk/PEER.key and, for a
SOCKS5 proxy that others may use, STORE/NAME/socks5.password. Directories are 0700 and files 0600
from their first byte; a file is written to a temporary name and renamed, so an interrupted run never
leaves a half-written key. The store carries its own .gitignore for plaintext secrets, so a `git add
-A` stages none wherever the store is. Every name that becomes a path is a validated hostname label.
Values are never logged or printed by this module.

By default the store is `secrets/` at the top of the profile's git repository (or beside the profile
when it is in none): where `appliance` is run from does not matter.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ApplianceError
from ..fsutil import atomic_write
from ..profile.loader import profile_root
from ..profile.types import check_name
from .keys import generate_preshared_key, generate_private_key, public_key

STORE_DIR = "secrets"
STORE_ENV = "APPLIANCE_SECRETS"
SECRET_SUFFIXES = (".key", ".password")
# plaintext secrets stay out of git wherever the store is; their .age files may be committed
GITIGNORE = "# appliance's secret store: plaintext keys never go into git (their .age files may)\n*.key\n*.password\n"


class SecretStoreError(ApplianceError):
    pass


def default_store_path(profile: Path | None = None) -> Path:
    """$APPLIANCE_SECRETS, else secrets/ at the top of the profile's git repository (or beside the
    profile when it is in none); without a profile, of the current directory's repository."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    return profile_root(profile if profile is not None else Path.cwd() / "profile.yaml") / STORE_DIR


def generate_password() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class ApplianceKeys:
    """What rendering needs: the private key (goes only into root-only files) and peers' PSKs."""

    private_key: str
    preshared_keys: dict[str, str]  # peer name -> key
    socks5_password: str | None = None  # for a SOCKS5 proxy others may use (not on loopback)

    @property
    def public_key(self) -> str:
        return public_key(self.private_key)

    def __repr__(self) -> str:  # keep secrets out of tracebacks and debug logs
        return (f"ApplianceKeys(public_key={self.public_key!r}, preshared_keys=<{len(self.preshared_keys)} redacted>"
                f"{', socks5_password=<redacted>' if self.socks5_password else ''})")


class SecretStore:
    def __init__(self, root: Path | None = None, create: bool = True, age_identity: Path | None = None):
        self.root = Path(root) if root is not None else default_store_path()
        self.create = create
        self.age_identity = age_identity

    def _dir(self, *parts: str) -> Path:
        for part in parts:
            _require_name(part)
        path = self.root.joinpath(*parts)
        if self.create:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            _require_private_dir(self.root)
            ignore = self.root / ".gitignore"
            if not ignore.exists():
                _write_file(ignore, GITIGNORE, 0o644)
            for p in [self.root.joinpath(*parts[: i + 1]) for i in range(len(parts))]:
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
        _require_name(peer)
        return self._get_or_create(self._dir(name, "psk") / f"{peer}.key", generate_preshared_key)

    def socks5_password(self, name: str) -> str:
        return self._get_or_create(self._dir(name) / "socks5.password", generate_password)

    def key_files(self, name: str) -> list[Path]:
        """Every plaintext secret of appliance `name` (keys and passwords)."""
        _require_name(name)
        base = self.root / name
        if not base.is_dir():
            return []
        return sorted(p for p in base.rglob("*") if p.suffix in SECRET_SUFFIXES and p.is_file() and not p.is_symlink())

    def appliance_keys(self, name: str, psk_peers: list[str], socks5: bool = False) -> ApplianceKeys:
        return ApplianceKeys(self.private_key(name), {p: self.preshared_key(name, p) for p in sorted(psk_peers)},
                             self.socks5_password(name) if socks5 else None)


def _require_name(name: str) -> None:
    try:
        check_name(name)
    except ValueError:
        raise SecretStoreError(f"{name[:70]!r} is not an appliance or peer name (a hostname label: lowercase "
                               "letters, digits and '-'): it would become a path in the secret store") from None


def _write_private(path: Path, text: str) -> None:
    atomic_write(path, text, 0o600)


def _write_file(path: Path, text: str, mode: int) -> None:
    atomic_write(path, text, mode)


def _require_private_dir(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecretStoreError(f"{path} is accessible by others (mode {mode:04o}): run chmod 700 {path}")


def _require_private_file(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SecretStoreError(f"{path} is readable by others (mode {mode:04o}): run chmod 600 {path}")
