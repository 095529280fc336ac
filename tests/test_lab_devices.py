"""The lab VM's devices follow the image: its architecture's QEMU and watchdog, and for a generic
(hardware) image an AHCI (amd64) or NVMe (arm64) disk and e1000e NICs, which the boot suite then finds in the guest
(lab_devices). Checked on QEMU's command line, without starting it."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.image.platform import PLATFORMS
from appliance.verify import vm as vm_module
from appliance.verify.firmware import Firmware
from appliance.verify.vm import VM, Nic, lab_devices


@pytest.fixture(autouse=True)
def firmware(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("code.fd", "vars.fd"):
        (tmp_path / name).write_bytes(b"\0")
    monkeypatch.setattr(vm_module, "uefi_firmware",
                        lambda *a: Firmware(tmp_path / "code.fd", tmp_path / "vars.fd", tmp_path / "d.json"))


def command(tmp_path: Path, arch: str = "amd64", hardware: bool = False) -> str:
    vm = VM(tmp_path / "disk.img", tmp_path / "vm", [Nic("tap0", "52:54:00:12:34:01")], plat=PLATFORMS[arch],
            hardware=hardware)
    vm.workdir.mkdir(parents=True)
    return " ".join(vm.command(tap_fds=[3]))


@pytest.mark.parametrize("arch,disk,prefix", [("amd64", "ide-hd,drive=disk,bus=ahci.0", "sd"),
                                               ("arm64", "nvme,drive=disk", "nvme")])
def test_a_generic_image_gets_hardware_a_vm_image_virtio(tmp_path: Path, arch: str, disk: str, prefix: str) -> None:
    """amd64: SATA on q35's AHCI; arm64: NVMe (Debian's AAVMF cannot boot from AHCI)."""
    hw, virt = command(tmp_path / "hw", arch, hardware=True), command(tmp_path / "virt", arch)
    assert f"-device {disk}" in hw and "virtio-blk" not in hw
    assert hw.count("e1000e,netdev=") == 2 and "virtio-net" not in hw  # management and lab NIC
    assert "virtio-blk-pci,drive=disk" in virt and virt.count("virtio-net-pci,netdev=") == 2 and "e1000e" not in virt
    assert lab_devices(True, PLATFORMS[arch]) == {"nic_driver": "e1000e", "disk_prefix": prefix}
    assert lab_devices(False, PLATFORMS[arch]) == {"nic_driver": "virtio_net", "disk_prefix": "vd"}


def test_each_architecture_its_own_qemu_and_watchdog(tmp_path: Path) -> None:
    amd64, arm64 = command(tmp_path / "a", "amd64"), command(tmp_path / "b", "arm64")
    assert amd64.startswith("qemu-system-x86_64 ") and "-device i6300esb -action watchdog=reset" in amd64
    assert arm64.startswith("qemu-system-aarch64 ") and "-machine virt " in arm64 and "i6300esb" not in arm64
    # TCG's pointer authentication costs half the arm64 lab's boot time; x86 has nothing to turn off
    assert " -cpu max,pauth=off " in arm64 and "pauth" not in amd64


@pytest.mark.parametrize("name,timeout", [("arm64-subnet-router", 480.0), ("fleet/sites/ams", 240.0),
                                          ("arm64-exit-node", 240.0), ("rpi4-subnet-router", 720.0)])
def test_an_emulated_full_kernel_gets_longer_lab_limits(tmp_path: Path, name: str, timeout: float) -> None:
    """A generic image of another architecture (full kernel, all under TCG: 100-150 s to its first
    handshake here) waits twice as long, a Pi in raspi4b three times; amd64 hardware and arm64 VMs
    do not."""
    from appliance.image import Cache
    from appliance.profile import load_profile
    from appliance.ui import step
    from appliance.verify.boot import BootTest
    from conftest import PROFILES

    lab = BootTest(load_profile(PROFILES / f"{name}.yaml").profile, Cache(tmp_path / "cache"), step,
                   workdir=tmp_path / "w")
    assert lab.timeout == timeout
