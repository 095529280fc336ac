"""testinfra checks of a built root tree (chroot backend): run by appliance build, see static.py.

Expectations come from the JSON file named by $APPLIANCE_EXPECT: the rendered config tree's
manifest, the units that must be enabled, the packages, and the paths of key files."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

EXPECT: dict[str, Any] = json.loads(open(os.environ["APPLIANCE_EXPECT"]).read())
ROWS = EXPECT["config"]


@pytest.mark.parametrize("row", ROWS, ids=[r["path"] for r in ROWS])
def test_rendered_entry(host: Any, row: dict[str, Any]) -> None:
    f = host.file("/" + row["path"])
    assert f.exists, "missing"
    assert f.user == "root" and f.group == "root"
    if row["kind"] == "symlink":
        assert f.is_symlink and host.check_output(f"readlink /{row['path']}") == row["target"]
        return
    assert f.mode == int(row["mode"], 8), f"mode {f.mode:04o}, expected {row['mode']}"
    if row["kind"] == "dir":
        assert f.is_directory
    elif not row.get("secret"):
        assert f.is_file and f.sha256sum == row["sha256"]


@pytest.mark.parametrize("unit", EXPECT["enabled_units"])
def test_unit_enabled(host: Any, unit: str) -> None:
    assert host.run(f"systemctl is-enabled {unit}").stdout.strip() in ("enabled", "enabled-runtime", "alias")


@pytest.mark.parametrize("package", EXPECT["packages"])
def test_package_installed(host: Any, package: str) -> None:
    assert host.package(package).is_installed


def test_key_files_root_only(host: Any) -> None:
    store = host.file("/etc/credstore")
    assert store.is_directory and store.mode == 0o700 and store.user == "root"
    assert EXPECT["secret_paths"]
    for path in EXPECT["secret_paths"]:
        f = host.file("/" + path)
        assert f.is_file and f.mode == 0o600 and f.user == "root", path


def test_private_key_nowhere_else(host: Any) -> None:
    """grep reads the key from its own file, so it never appears on a command line."""
    key_file = "/" + EXPECT["secret_paths"][0]
    found = host.run(f"grep -rlF -f {key_file} /etc /root /usr/local /var /opt /srv 2>/dev/null")
    assert set(found.stdout.split()) <= {"/" + p for p in EXPECT["secret_paths"]}


def test_no_host_identity_baked(host: Any) -> None:
    assert not host.run("ls /etc/ssh/ssh_host_* 2>/dev/null").stdout.strip()
    assert host.file("/etc/machine-id").size == 0


def test_kernel_only_in_the_uki(host: Any) -> None:
    """Kernel and initramfs boot from the UKI on the ESP; the root keeps the modules they load."""
    assert host.run("ls /boot/vmlinuz-* /boot/initrd.img-* /vmlinuz /initrd.img").rc != 0
    assert host.run("ls /usr/lib/modules/*/modules.dep").rc == 0
    assert host.run("ls /usr/lib/modules/*/kernel/drivers/net/wireguard/wireguard.ko*").rc == 0


def test_ruleset_checks_with_image_nft(host: Any) -> None:
    """The image's own nft (trixie) accepts the ruleset; -c commits nothing."""
    result = host.run("nft -c -f /etc/nftables.conf")
    assert result.rc == 0, result.stderr
