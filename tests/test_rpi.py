"""The Raspberry Pi 4 board without a Pi: its entries in the board table, its boot partition's
checks (each with a planted mistake they must catch), the device tree change QEMU's raspi4b needs,
the console watch, and the refusal of updates in the field. The image's own build and raspi4b boot
are in tests/test_boot.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from appliance.errors import InputError
from appliance.image import image_spec
from appliance.image.disk import DiskIds, Slot, kernel_cmdline
from appliance.image.platform import board_boot
from appliance.image.rpi_boot import boot_files, config_txt
from appliance.image.run import ImageError
from appliance.profile import load_profile
from appliance.update import require_updatable
from appliance.verify import raspi
from conftest import PROFILES, require_tool

PI = load_profile(PROFILES / "rpi4-subnet-router.yaml").profile
BOOT = board_boot("rpi4")


def test_board_table_for_rpi4() -> None:
    spec = image_spec(PI)
    assert (spec.kernel_package, spec.initramfs, spec.boot.kind, spec.serial) == (
        "linux-image-arm64", "initramfs-tools", "rpi", "ttyS1")
    assert not spec.vm
    cmdline = kernel_cmdline(DiskIds.for_name(PI.name), Slot.A, vm=False, serial=spec.serial)
    assert f"root=PARTUUID={DiskIds.for_name(PI.name).root_a}" in cmdline
    assert cmdline.split()[-1] == "console=ttyS1,115200"  # the last console= is /dev/console
    # the UEFI boards are as before
    assert image_spec(load_profile(PROFILES / "exit-node.yaml").profile).boot.kind == "uefi"


def test_board_tables_agree() -> None:
    """The profile's boards (and their architectures), the image's Board enum and the boot table
    name the same boards; every architecture a board runs is one the platform table has."""
    from appliance.image.platform import BOARD_BOOT, PLATFORMS
    from appliance.image.spec import Board
    from appliance.profile.model import BOARD_ARCHES

    assert set(BOARD_ARCHES) == set(BOARD_BOOT) == {b.value for b in Board}
    assert {a for archs in BOARD_ARCHES.values() for a in archs} <= set(PLATFORMS)
    assert all(b.dtbs for b in BOARD_BOOT.values() if b.kind == "rpi")  # raspi4b boots the first


def test_hardware_boards_share_one_base_tree(tmp_path: Path) -> None:
    """rpi4 and arm64 generic get the same root tree (one cached build, ~10 min under qemu-user, for
    both); the board's boot files differ. Controls: the VM board and another architecture do not."""
    text = (PROFILES / "rpi4-subnet-router.yaml").read_text()

    def spec_for(board: str, arch: str = "arm64"):  # type: ignore[no-untyped-def]
        path = tmp_path / f"{board}-{arch}.yaml"
        path.write_text(text.replace("board: rpi4", f"board: {board}").replace("arch: arm64", f"arch: {arch}"))
        return image_spec(load_profile(path).profile)

    pi, generic = spec_for("rpi4"), spec_for("generic")
    assert pi.base_inputs() == generic.base_inputs() and pi.boot != generic.boot
    assert spec_for("qemu").base_inputs() != generic.base_inputs()
    assert spec_for("generic", "amd64").base_inputs() != generic.base_inputs()


def test_pi_images_are_not_updated_in_the_field() -> None:
    with pytest.raises(InputError, match="tryboot"):
        require_updatable(image_spec(PI))
    require_updatable(image_spec(load_profile(PROFILES / "exit-node.yaml").profile))  # control


def test_config_txt_names_what_the_partition_holds(tmp_path: Path) -> None:
    fw = tmp_path / "fw" / "usr/lib/raspi-firmware"
    fw.mkdir(parents=True)
    for f in ("start4.elf", "fixup4.dat", "start4x.elf", "fixup4x.dat", "start.elf", "bootcode.bin"):
        (fw / f).write_bytes(b"x")
    files = boot_files(BOOT, tmp_path / "fw", tmp_path / "vmlinuz-6.12", tmp_path / "initrd.img-6.12",
                       tmp_path / "dtbs", "root=PARTUUID=x", "pi")
    assert {"start4.elf", "fixup4.dat", "bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb", "bcm2711-rpi-cm4-io.dtb",
            "vmlinuz-6.12", "initrd.img-6.12", "config.txt", "cmdline.txt"} == set(files)  # no Pi 1-3 firmware,
    # no variant config.txt does not select
    config = str(files["config.txt"])
    assert raspi.config_value(config, "kernel") == "vmlinuz-6.12"
    assert raspi.config_value(config, "initramfs") == "initrd.img-6.12"
    assert raspi.config_value(config, "arm_64bit") == "1"
    assert files["cmdline.txt"] == "root=PARTUUID=x\n"
    assert config == config_txt("pi", "vmlinuz-6.12", "initrd.img-6.12")
    (fw / "fixup4.dat").unlink()  # a firmware package without a file the board needs stops the build
    with pytest.raises(ImageError, match=r"no fixup4.dat in raspi-firmware \(/usr/lib/raspi-firmware\)"):
        boot_files(BOOT, tmp_path / "fw", tmp_path / "vmlinuz-6.12", tmp_path / "initrd.img-6.12",
                   tmp_path / "dtbs", "root=PARTUUID=x", "pi")


def _pi_disk(tmp_path: Path, name: str, *, cmdline: str | None = None, drop: str = "",
             config: str | None = None, boot_type: str = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7") -> Path:
    """A small GPT disk with a FAT boot partition as the build lays it out (slot A's PARTUUID from name)."""
    for tool in ("sfdisk", "mkfs.fat", "mcopy"):
        require_tool(tool)
    ids = DiskIds.for_name(name)
    img = tmp_path / "pi.img"
    with open(img, "wb") as f:
        f.truncate(64 * 2**20)
    table = ("label: gpt\n"
             f"start=2048, size=40960, type={boot_type}\n"
             f"start=43008, size=8192, type=B921B045-1DF0-41C3-AF44-4C6F280D3FAE, uuid={ids.root_a}\n"
             f"start=51200, size=8192, type=B921B045-1DF0-41C3-AF44-4C6F280D3FAE, uuid={ids.root_b}\n")
    subprocess.run(["sfdisk", "-q", str(img)], input=table, text=True, check=True)
    fat = tmp_path / "boot.fat"
    subprocess.run(["mkfs.fat", "-C", str(fat), str(20 * 1024)], check=True, capture_output=True)
    stage = tmp_path / "files"
    stage.mkdir()
    names = ["start4.elf", "fixup4.dat", *BOOT.dtbs, "vmlinuz-6.12", "initrd.img-6.12"]
    for n in names:
        (stage / n).write_bytes(b"x")
    (stage / "config.txt").write_text(config or config_txt(name, "vmlinuz-6.12", "initrd.img-6.12"))
    root = f"PARTUUID={ids.root_a}"
    (stage / "cmdline.txt").write_text((cmdline or kernel_cmdline(ids, Slot.A, serial="ttyS1")) + "\n")
    files = [str(p) for p in sorted(stage.iterdir()) if p.name != drop]
    subprocess.run(["mcopy", "-i", str(fat), *files, "::/"], check=True, env={"MTOOLS_SKIP_CHECK": "1"})
    with open(img, "r+b") as out:
        out.seek(2048 * 512)
        out.write(fat.read_bytes())
    assert root  # the default command line boots slot A
    return img


def test_boot_partition_check_passes_a_good_partition(tmp_path: Path) -> None:
    img = _pi_disk(tmp_path, "pi")
    assert raspi.check_boot_partition(img, "pi", BOOT, tmp_path) == []


@pytest.mark.parametrize("planted,want", [
    ({"drop": "bcm2711-rpi-400.dtb"}, "no device tree bcm2711-rpi-400.dtb"),
    ({"drop": "start4.elf"}, "no firmware file start4.elf"),
    ({"drop": "cmdline.txt"}, "no cmdline.txt"),
    ({"config": "arm_64bit=1\nkernel=vmlinuz-6.11\ninitramfs initrd.img-6.12\n"}, "config.txt's kernel (vmlinuz-6.11)"),
    ({"config": "kernel=vmlinuz-6.12\ninitramfs initrd.img-6.12\n"}, "arm_64bit=1"),
    ({"cmdline": f"root=PARTUUID={DiskIds.for_name('pi').root_b} rootfstype=erofs ro"}, "is not slot A's partition"),
    ({"cmdline": f"root=PARTUUID={DiskIds.for_name('pi').root_a} ro"}, "rootfstype=erofs"),
    ({"cmdline": "root=/dev/mmcblk0p2 rootfstype=erofs"}, "cmdline.txt's root (none)"),
    ({"boot_type": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"}, "partition 1 is of type C12A7328"),
])
def test_boot_partition_check_catches(tmp_path: Path, planted: dict[str, str], want: str) -> None:
    img = _pi_disk(tmp_path, "pi", **planted)
    problems = raspi.check_boot_partition(img, "pi", BOOT, tmp_path)
    assert any(want in p for p in problems), problems


def test_another_appliances_disk_is_caught(tmp_path: Path) -> None:
    img = _pi_disk(tmp_path, "other-pi")
    problems = raspi.check_boot_partition(img, "pi", BOOT, tmp_path)
    assert any("is not pi's" in p for p in problems), problems


DTS = """/dts-v1/;
/ {
    compatible = "raspberrypi,4-model-b", "brcm,bcm2711";
    soc {
        intc: interrupt-controller@7ef00100 { compatible = "brcm,bcm2711-l2-intc", "brcm,l2-intc"; };
        i2c@7ef04500 { compatible = "brcm,bcm2711-hdmi-i2c"; };
        mmc@7e340000 { compatible = "brcm,bcm2711-emmc2"; };
        clock@7ef00000 { compatible = "brcm,brcm2711-dvp"; };
        mmc@7e300000 { compatible = "brcm,bcm2835-sdhci"; mmc-pwrseq = <1>; non-removable; };
    };
};
"""


def test_nodes_qemu_lacks_are_disabled_and_no_others(tmp_path: Path) -> None:
    for tool in ("dtc", "fdtget", "fdtput"):
        require_tool(tool)
    dtb = tmp_path / "board.dtb"
    subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", str(dtb)], input=DTS, text=True, check=True)
    disabled = raspi.disable_not_modelled(dtb)
    assert sorted(disabled) == ["/soc/clock@7ef00000", "/soc/i2c@7ef04500", "/soc/interrupt-controller@7ef00100"]

    def status(node: str) -> str:
        proc = subprocess.run(["fdtget", str(dtb), node, "status"], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else "(none)"

    assert {status(n) for n in disabled} == {"disabled"}
    assert status("/soc/mmc@7e340000") == "(none)"  # the SD controller stays
    assert raspi.card_on_legacy_sdhci(dtb) == ["/soc/mmc@7e300000"]
    gone = subprocess.run(["fdtget", str(dtb), "/soc/mmc@7e300000", "mmc-pwrseq"], capture_output=True)
    assert gone.returncode != 0
    kept = subprocess.run(["fdtget", str(dtb), "/soc/mmc@7e300000", "non-removable"], capture_output=True)
    assert kept.returncode == 0


def test_qemu_command_line_changes_only_console_status_and_watchdog() -> None:
    image = kernel_cmdline(DiskIds.for_name("pi"), Slot.A, serial="ttyS1")
    qemu = raspi.qemu_cmdline(image, BOOT, image_spec(PI).platform)
    assert qemu.split()[: len(image.split())] == [w.replace("console=ttyS1", "console=ttyAMA0") for w in image.split()]
    assert qemu.split()[len(image.split()):] == ["systemd.show_status=1", "systemd.watchdog_sec=0"]
    assert "console=ttyS1" not in qemu


def _fake_qemu(tmp_path: Path, script: str) -> list[str]:
    fake = tmp_path / "qemu"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    return [str(fake)]


def test_console_watch_sees_the_target_and_reports_a_boot_without_it(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    prompt = re.compile(re.escape(raspi.REACHED))
    with open(tmp_path / "q.log", "wb") as log:
        # as systemd colours it: escapes between "Reached target" and the unit
        cmd = _fake_qemu(tmp_path, f"sleep 1; printf '[\\033[0;32m  OK  \\033[0m] Reached target "
                                   f"\\033[0;1;39mmulti-user.target\\033[0m - Multi-User\\n' > {console}; sleep 60")
        seen = raspi._watch(cmd, Path(cmd[0]), log, console, prompt, 30, [])
    assert seen.reached and seen.seconds < 30
    console.unlink()
    with open(tmp_path / "q.log", "wb") as log:
        cmd = _fake_qemu(tmp_path, f"printf 'Kernel panic - not syncing\\n' > {console}; exit 1")
        seen = raspi._watch(cmd, Path(cmd[0]), log, console, prompt, 30, [])
    assert not seen.reached and "panic" in seen.console


def test_failed_units_are_read_from_the_console() -> None:
    console = ("\x1b[0;1;31mFAILED\x1b[0m] ignored\n"
               "[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39mappliance-health.s…tunnel and SSH.\n"
               "[\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39msystemd-networkd.service\x1b[0m - Network.\n"
               "[  OK  ] Started systemd-logind.service\n")
    assert raspi.failed_units(console) == ["appliance-health.s…tunnel", "systemd-networkd.service"]
    assert raspi.failed_units("[  OK  ] Reached target multi-user.target\n") == []
