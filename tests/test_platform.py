"""The architecture table: what each platform's entries name, and that nothing outside it names an
architecture (issue #17: one place for everything arch-specific)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import appliance
from appliance.image.platform import HOST, PLATFORMS, platform
from appliance.profile.model import System

# the UAPI Discoverable Partitions Specification's root partition types
ROOT_TYPES = {"amd64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "arm64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"}
ARCH_WORDS = re.compile(r"amd64|arm64|x86[_-]64|aarch64|ttyS0|ttyAMA0|(?i:x64\.efi|aa64\.efi)")
# where an architecture may be named: the table itself, and the profile's field with its enum
ALLOWED = {"image/platform.py", "profile/model.py", "image/spec.py"}


def test_every_architecture_a_profile_allows_has_a_platform() -> None:
    allowed = System.model_fields["arch"].annotation.__args__  # type: ignore[union-attr]
    assert set(allowed) == set(PLATFORMS)
    for arch, plat in PLATFORMS.items():
        assert plat.arch == arch and plat.root_type == ROOT_TYPES[arch]
        assert plat.uki_stub.endswith(f"linux{plat.uefi}.efi.stub") and plat.systemd_boot.endswith(f"{plat.uefi}.efi")
    assert HOST.fallback_loader == "/EFI/BOOT/BOOTX64.EFI"
    with pytest.raises(ValueError, match="known: amd64, arm64"):
        platform("riscv64")


def test_no_architecture_is_named_outside_the_table() -> None:
    root = Path(appliance.__file__).parent
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.suffix not in (".py", ".j2") or rel in ALLOWED or rel.startswith("dataplane/netstack"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if ARCH_WORDS.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_check_catches_a_planted_literal() -> None:
    assert ARCH_WORDS.search('SYSTEMD_BOOT = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"')
    assert ARCH_WORDS.search('"--stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub"')
    assert not ARCH_WORDS.search("f\"--stub={plat.uki_stub}\"")
    assert ARCH_WORDS.search('"--architectures=amd64"') and ARCH_WORDS.search("mcopy ::/EFI/BOOT/BOOTX64.EFI")
    assert ARCH_WORDS.search('["qemu-system-x86_64", "-accel"]') and ARCH_WORDS.search("console=ttyS0,115200")
