"""Modules left without a dependency after the excludes (orphan_modules): found from what each module
file says it depends on, removed to the fixed point, and only in hardware trees."""

from __future__ import annotations

import lzma
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.image import image_spec, orphan_modules
from appliance.image.rootfs import ORPHANS_SCRIPT
from appliance.profile import load_profile
from conftest import PROFILES


def _module(root: Path, rel: str, depends: str, xz: bool = True) -> Path:
    """A file with what the kernel's build puts in a module's .modinfo, among other bytes."""
    data = b"\x7fELF...\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6.12\0"
    path = root / (rel + (".ko.xz" if xz else ".ko"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(data) if xz else data)
    return path


def test_reads_depends_from_compressed_and_plain_modules(tmp_path: Path) -> None:
    xz = _module(tmp_path, "drivers/hid/i2c-hid/i2c-hid", "drm,hid")
    plain = _module(tmp_path, "drivers/net/dummy", "", xz=False)
    assert orphan_modules.depends(xz) == ["drm", "hid"]
    assert orphan_modules.depends(plain) == []
    assert orphan_modules.module_name(xz) == "i2c_hid"  # dashes are underscores to the kernel


def test_removes_orphans_and_what_needs_them_keeps_the_rest(tmp_path: Path) -> None:
    v = tmp_path / "6.12.0-1-amd64"
    kept = [_module(v, "drivers/hid/hid", ""), _module(v, "drivers/hid/usbhid/usbhid", "hid"),
            _module(v, "drivers/net/ethernet/intel/e1000e/e1000e", "")]
    gone = [_module(v, "drivers/hid/i2c-hid/i2c-hid", "drm,hid"),
            _module(v, "drivers/hid/i2c-hid/i2c-hid-acpi", "i2c-hid")]  # needs an orphan: goes too
    assert orphan_modules.prune(v) == {"i2c_hid": ["drm"], "i2c_hid_acpi": ["i2c_hid"]}
    assert all(p.exists() for p in kept)  # control: a module whose dependencies are all there stays
    assert not any(p.exists() for p in gone)


def test_the_hook_script_runs_on_its_own_and_says_what_it_removed(tmp_path: Path) -> None:
    """What the build runs: the module's file by itself (no package around it), over every kernel."""
    _module(tmp_path / "6.12.0-1-arm64", "drivers/net/can/can-dev", "can")
    _module(tmp_path / "6.12.0-1-arm64", "drivers/net/tun", "")
    out = subprocess.run([sys.executable, "-I", ORPHANS_SCRIPT, tmp_path], capture_output=True, text=True,
                         check=True).stdout
    assert out == "6.12.0-1-arm64: removed can_dev: it needs can, which the image leaves out\n"
    assert (tmp_path / "6.12.0-1-arm64/drivers/net/tun.ko.xz").exists()


def test_a_compression_it_cannot_read_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "wireguard.ko.zst").write_bytes(b"(\xb5/\xfd")
    with pytest.raises(ValueError, match="compressed in a form this does not read"):
        orphan_modules.module_files(tmp_path)


def test_hardware_trees_prune_vm_trees_keep_their_cache_key() -> None:
    hardware = image_spec(load_profile(PROFILES / "rpi4-subnet-router.yaml").profile)
    vm = image_spec(load_profile(PROFILES / "exit-node.yaml").profile)
    assert hardware.prune_orphan_modules and hardware.base_inputs()["prune_orphan_modules"] is True
    assert not vm.prune_orphan_modules and "prune_orphan_modules" not in vm.base_inputs()
    assert "drivers/scsi/lpfc" in hardware.modules_exclude and "drivers/scsi/mpt3sas" not in hardware.modules_exclude
