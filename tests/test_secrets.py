"""Keys: X25519 agrees with wireguard-tools; the store is private (0700/0600), stable and atomic."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

import pytest

from appliance.secrets import SecretStore, SecretStoreError, generate_private_key, public_key
from conftest import require_tool


def test_public_key_matches_wg_pubkey() -> None:
    wg = require_tool("wg")
    for _ in range(3):
        private = generate_private_key()
        expected = subprocess.run([wg, "pubkey"], input=private + "\n", capture_output=True, text=True,
                                  check=True).stdout.strip()
        assert public_key(private) == expected


def test_wg_genkey_keys_are_accepted() -> None:
    wg = require_tool("wg")
    private = subprocess.run([wg, "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    assert len(base64.b64decode(public_key(private))) == 32


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_store_creates_private_files(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "secrets")
    keys = store.appliance_keys("edge-1", ["phone"])
    assert _mode(tmp_path / "secrets") == 0o700
    assert _mode(tmp_path / "secrets" / "edge-1") == 0o700
    assert _mode(tmp_path / "secrets" / "edge-1" / "private.key") == 0o600
    assert _mode(tmp_path / "secrets" / "edge-1" / "psk" / "phone.key") == 0o600
    assert not list((tmp_path / "secrets" / "edge-1").glob(".*tmp"))
    again = SecretStore(tmp_path / "secrets").appliance_keys("edge-1", ["phone"])
    assert again.private_key == keys.private_key and again.preshared_keys == keys.preshared_keys


def test_store_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        SecretStore(tmp_path / "s").private_key("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "s" / "x" / "private.key") == 0o600
    assert _mode(tmp_path / "s" / "x") == 0o700


def test_store_refuses_readable_key(tmp_path: Path) -> None:
    store = SecretStore(tmp_path / "s")
    store.private_key("x")
    os.chmod(tmp_path / "s" / "x" / "private.key", 0o644)
    with pytest.raises(SecretStoreError, match="chmod 600"):
        store.private_key("x")


def test_store_without_create(tmp_path: Path) -> None:
    with pytest.raises(SecretStoreError, match="does not exist"):
        SecretStore(tmp_path / "s", create=False).private_key("x")


def test_keys_repr_hides_secrets(tmp_path: Path) -> None:
    keys = SecretStore(tmp_path / "s").appliance_keys("x", ["p"])
    assert keys.private_key not in repr(keys)
    assert keys.preshared_keys["p"] not in repr(keys)
