"""UEFI firmware for the test VMs, found the way libvirt finds it: through QEMU's firmware descriptors
(docs/interop/firmware.json: JSON files in /usr/share/qemu/firmware and /etc/qemu/firmware, the lower
file name first, /etc overriding a file of the same name), not by hard-coded paths."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ApplianceError
from ..image.platform import HOST

DESCRIPTOR_DIRS = (Path("/usr/share/qemu/firmware"), Path("/etc/qemu/firmware"))
# a VM of the lab runs without SMM and without Secure Boot
_UNWANTED = {"requires-smm", "secure-boot", "enrolled-keys"}


class FirmwareError(ApplianceError):
    pass


@dataclass(frozen=True)
class Firmware:
    code: Path  # read-only flash
    vars_template: Path  # copied per VM: the variable store
    descriptor: Path


def _descriptors(dirs: tuple[Path, ...]) -> list[Path]:
    by_name: dict[str, Path] = {}
    for d in dirs:  # later directories override earlier ones, file by file
        if d.is_dir():
            for f in d.glob("*.json"):
                by_name[f.name] = f
    return [by_name[n] for n in sorted(by_name)]


def _fits(doc: dict[str, Any], arch: str, machine: str) -> bool:
    mapping = doc.get("mapping")
    if "uefi" not in (doc.get("interface-types") or []) or not isinstance(mapping, dict):
        return False
    if mapping.get("device") != "flash" or "nvram-template" not in mapping:
        return False
    if _UNWANTED & set(doc.get("features") or []):
        return False
    targets = doc.get("targets") or []
    return any(t.get("architecture") == arch and any(fnmatch.fnmatch(machine, m) for m in t.get("machines", []))
               for t in targets if isinstance(t, dict))


def uefi_firmware(arch: str = HOST.firmware_arch, machine: str = HOST.firmware_machine,
                  dirs: tuple[Path, ...] = DESCRIPTOR_DIRS) -> Firmware:
    """The first described UEFI build for arch/machine without SMM or Secure Boot."""
    for path in _descriptors(dirs):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and _fits(doc, arch, machine):
            mapping = doc["mapping"]
            fw = Firmware(Path(mapping["executable"]["filename"]), Path(mapping["nvram-template"]["filename"]), path)
            if fw.code.exists() and fw.vars_template.exists():
                return _smaller_sibling(fw)
    raise FirmwareError(f"no UEFI firmware for {arch} ({machine}) is described in {', '.join(map(str, dirs))}: "
                        "install ovmf (make setup)")


def _smaller_sibling(fw: Firmware) -> Firmware:
    """Debian bookworm's ovmf also ships a 2 MiB build beside the 4 MiB one it describes (no Secure
    Boot, a smaller variable store): it starts 0.6 s sooner under TCG. Newer releases ship only 4 MiB."""
    code, vars_template = (Path(str(p).replace("_4M.fd", ".fd")) for p in (fw.code, fw.vars_template))
    if "_4M.fd" in fw.code.name and code.exists() and vars_template.exists():
        return Firmware(code, vars_template, fw.descriptor)
    return fw
