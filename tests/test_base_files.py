"""The base tree's own files (rootfs.base_files), as written before mmdebstrap copies them in: the
hardware initramfs's module classes and their hook, the VM's tiny-initramfs settings."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from appliance.image import image_spec
from appliance.image.rootfs import INITRAMFS_CLASSES_HOOK, base_files, write_base_files
from appliance.profile import load_profile
from conftest import PROFILES

HARDWARE = image_spec(load_profile(PROFILES / "rpi4-subnet-router.yaml").profile)
VM = image_spec(load_profile(PROFILES / "exit-node.yaml").profile)


def test_hardware_initramfs_takes_storage_classes_not_nics(tmp_path: Path) -> None:
    files = base_files(HARDWARE, 0)
    hook = files[INITRAMFS_CLASSES_HOOK]
    classes = hook.splitlines()[-1].split()
    assert classes[0] == "auto_add_modules" and {"base", "scsi", "ata", "mmc", "usb_storage", "block"} <= set(classes)
    assert "net" not in classes  # NIC drivers load from the root
    assert subprocess.run(["sh", "-n", "-c", hook]).returncode == 0
    write_base_files(files, tmp_path / "files")
    mode = (tmp_path / "files" / INITRAMFS_CLASSES_HOOK).stat().st_mode
    assert stat.S_IMODE(mode) == 0o755  # initramfs-tools skips a hook it cannot execute
    assert stat.S_IMODE((tmp_path / "files/etc/initramfs-tools/modules").stat().st_mode) == 0o644  # control


def test_vm_keeps_tiny_initramfs_and_its_cache_key_form() -> None:
    files = base_files(VM, 0)
    assert INITRAMFS_CLASSES_HOOK not in files and "etc/tiny-initramfs/tiny-initramfs.conf" in files
    assert "initrd_classes" not in VM.base_inputs()  # VM trees cached before the field stay valid
    assert HARDWARE.base_inputs()["initrd_classes"]  # control: a hardware tree is keyed on them
