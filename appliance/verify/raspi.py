"""A Raspberry Pi image, proven before anyone flashes it.

Read without mounting: the partition table (sfdisk --json) and the boot partition's files (mtools at
the partition's offset). Checked: the firmware's files are there, config.txt names a kernel and an
initramfs that are there, every device tree of the board's models is there, and cmdline.txt boots
root slot A by its PARTUUID with the root file system's type.

Booted: the image's own kernel, initramfs, device tree and command line, and its root from the image
as an SD card, in QEMU's raspi4b machine (QEMU >= 9) until systemd reaches multi-user.target. What
that proves: the kernel runs on the BCM2711's cores and interrupt controller with this device tree,
the initramfs finds the SD card and the root by PARTUUID, erofs mounts, /var mounts, systemd brings
the appliance's units up. What it does not: the firmware's own boot (QEMU loads kernel, initramfs and
device tree itself), Ethernet, USB and PCIe (raspi4b models none; so the health check, which needs
the uplink, fails there and is the one failure allowed), the WireGuard traffic the UEFI boards' lab
suite sends.

What is changed for QEMU, each for a part raspi4b does not model as a Pi 4 has it:
- device tree (a copy): the HDMI block's interrupt controller, I2C and clock gates are disabled (the
  kernel's access to them is a synchronous external abort); QEMU puts the SD card on the BCM2835's
  SDHCI, where a Pi 4 has its Wi-Fi chip, not on EMMC2: that controller's Wi-Fi power sequence goes;
- command line: the console moves from the mini UART (ttyS1: QEMU's model interrupts without end
  once the console opens it, and the kernel stalls) to the PL011; systemd shows its status there
  (`quiet` hides multi-user.target otherwise); systemd arms no hardware watchdog (QEMU's BCM2835 PM
  block resets the machine the moment one is armed: it has no countdown);
- the SD card is a 4 GiB overlay on the image (QEMU wants an SD card's size to be a power of two)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ..image.disk import ROOT_FS_TYPE, DiskIds, Slot
from ..image.platform import HOST, BoardBoot, Platform
from ..image.rpi_boot import CMDLINE_TXT, CONFIG_TXT
from ..runner import CommandFailed, run

# where scripts/setup unpacks bookworm-backports' qemu-system-arm when the host's QEMU has no raspi4b
PRIVATE_QEMU = Path("/opt/appliance/qemu")
QEMU_ENV = "APPLIANCE_QEMU_RASPI"
MACHINE = "raspi4b"
# device tree nodes of the HDMI block (not modelled by QEMU), by compatible string
NOT_MODELLED = ("brcm,l2-intc", "brcm,bcm2711-hdmi-i2c", "brcm,brcm2711-dvp")
SD_SIZE = "4G"
LEGACY_SDHCI = "brcm,bcm2835-sdhci"
REACHED = "Reached target multi-user.target"
# what fails in raspi4b for want of Ethernet: the health check (uplink, tunnel, SSH)
FAILS_WITHOUT_ETHERNET = ("appliance-health",)


class RaspiError(CommandFailed):
    pass


def qemu_with_raspi4b(plat: Platform) -> Path:
    """The architecture's QEMU with the raspi4b machine: $APPLIANCE_QEMU_RASPI, the host's, or the one
    scripts/setup unpacked."""
    candidates = [os.environ.get(QEMU_ENV), shutil.which(plat.qemu), str(PRIVATE_QEMU / "usr/bin" / plat.qemu)]
    for c in candidates:
        if c and Path(c).is_file():
            proc = subprocess.run([c, "-machine", "help"], capture_output=True, text=True, env=_qemu_env(Path(c)))
            if re.search(rf"^{MACHINE}\s", proc.stdout, re.M):
                return Path(c)
    raise RaspiError(f"no {plat.qemu} with the {MACHINE} machine (QEMU >= 9): run scripts/setup (on bookworm it "
                     f"unpacks bookworm-backports' qemu-system-arm into {PRIVATE_QEMU}) or set {QEMU_ENV}")


def _qemu_env(qemu: Path) -> dict[str, str]:
    # an unpacked QEMU must not load the host's (older) QEMU's modules
    return {**os.environ, "QEMU_MODULE_DIR": str(qemu.parent.parent / "lib" / HOST.multiarch / "qemu")}


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int
    type: str
    uuid: str


def partitions(image: Path) -> list[Partition]:
    table = json.loads(run(["sfdisk", "--json", str(image)]).stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    return [Partition(i + 1, p["start"] * sector, p["size"] * sector, p["type"].upper(), p.get("uuid", "").upper())
            for i, p in enumerate(table["partitions"])]


def boot_partition_files(image: Path, part: Partition) -> list[str]:
    out = run(["mdir", "-b", "-i", f"{image}@@{part.start}", "::/"], env={"MTOOLS_SKIP_CHECK": "1"})
    return sorted(line.strip().removeprefix("::/") for line in out.stdout.splitlines() if line.strip())


def read_boot_file(image: Path, part: Partition, name: str, dest: Path) -> Path:
    run(["mcopy", "-n", "-i", f"{image}@@{part.start}", f"::/{name}", str(dest)],
        env={"MTOOLS_SKIP_CHECK": "1"})
    return dest


def config_value(config: str, key: str) -> str | None:
    """A setting of config.txt: `key=value`, or `initramfs FILE` for the initramfs."""
    for line in config.splitlines():
        line = line.split("#", 1)[0].strip()
        if key == "initramfs" and line.startswith("initramfs "):
            return line.split()[1]
        if line.startswith(f"{key}="):
            return line.split("=", 1)[1].strip()
    return None


def check_boot_partition(image: Path, name: str, boot: BoardBoot, work: Path) -> list[str]:
    """What is wrong with the image's Pi boot partition (empty: nothing)."""
    parts = partitions(image)
    if not parts:
        return ["the image has no partition table"]
    if boot.part_type and parts[0].type != boot.part_type.upper():
        return [f"partition 1 is of type {parts[0].type}, not {boot.part_type} (what the Pi's EEPROM boots from)"]
    files = boot_partition_files(image, parts[0])
    problems = _missing_files(files, boot)
    if problems:
        return problems
    config = read_boot_file(image, parts[0], CONFIG_TXT, work / CONFIG_TXT).read_text()
    cmdline = read_boot_file(image, parts[0], CMDLINE_TXT, work / CMDLINE_TXT).read_text().strip()
    return _config_problems(config, files) + _cmdline_problems(cmdline, parts, name)


def _missing_files(files: list[str], boot: BoardBoot) -> list[str]:
    problems = [f"no firmware file {pattern} on the boot partition" for pattern in boot.firmware_files
                if not any(Path(f).match(pattern) for f in files)]
    problems += [f"no device tree {dtb} on the boot partition" for dtb in boot.dtbs if dtb not in files]
    return problems + [f"no {wanted} on the boot partition" for wanted in (CONFIG_TXT, CMDLINE_TXT)
                       if wanted not in files]


def _config_problems(config: str, files: list[str]) -> list[str]:
    problems = [] if config_value(config, "arm_64bit") == "1" else ["config.txt does not set arm_64bit=1"]
    for key in ("kernel", "initramfs"):
        value = config_value(config, key)
        if value is None or value not in files:
            problems.append(f"config.txt's {key} ({value}) is not on the boot partition")
    return problems


def _cmdline_problems(cmdline: str, parts: list[Partition], name: str) -> list[str]:
    problems = []
    slot_a = next((p for p in parts if p.number == Slot.A.number), None)
    root = re.search(r"(?:^| )root=PARTUUID=(\S+)", cmdline)
    if slot_a is None or root is None or root.group(1).upper() != slot_a.uuid:
        problems.append(f"cmdline.txt's root ({root.group(1) if root else 'none'}) is not slot A's partition "
                        f"({slot_a.uuid if slot_a else 'missing'})")
    elif slot_a.uuid != DiskIds.for_name(name).slot_partition(Slot.A).upper():
        problems.append(f"slot A's partition UUID {slot_a.uuid} is not {name}'s")
    if f"rootfstype={ROOT_FS_TYPE}" not in cmdline.split():
        problems.append(f"cmdline.txt does not say rootfstype={ROOT_FS_TYPE}")
    if "\n" in cmdline:
        problems.append("cmdline.txt has more than one line (the firmware reads the first)")
    return problems


def _nodes_with(dts: str, compatibles: tuple[str, ...]) -> list[str]:
    """Paths of the device tree's nodes whose compatible lists one of compatibles."""
    found: list[str] = []
    path: list[str] = []
    for raw in dts.splitlines():
        line = raw.strip()
        if m := re.match(r"^(?:[\w-]+: )?([\w,@.+-]+|/) \{$", line):
            path.append(m.group(1))
        elif line == "};" and path:
            path.pop()
        elif line.startswith("compatible = "):
            values = re.findall(r'"([^"]*)"', line.replace("\\0", '" "'))
            if any(c in values for c in compatibles):
                found.append("/" + "/".join(path[1:]))
    return found


def disable_not_modelled(dtb: Path, compatibles: tuple[str, ...] = NOT_MODELLED) -> list[str]:
    """Disable the device tree's nodes whose compatible lists one of compatibles; their paths."""
    found = _nodes_with(run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(dtb)]).stdout, compatibles)
    for node in found:
        run(["fdtput", "-t", "s", str(dtb), node, "status", "disabled"])
    return found


def card_on_legacy_sdhci(dtb: Path) -> list[str]:
    """QEMU puts the SD card on the BCM2835's SDHCI (where a Pi 4 has its Wi-Fi chip), not on EMMC2:
    that controller's Wi-Fi power sequence (GPIOs behind the firmware, not modelled) goes."""
    found = _nodes_with(run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(dtb)]).stdout, (LEGACY_SDHCI,))
    for node in found:
        run(["fdtput", "-d", str(dtb), node, "mmc-pwrseq"], check=False)
    return found


def qemu_cmdline(cmdline: str, boot: BoardBoot, plat: Platform) -> str:
    """The image's command line with the changes raspi4b needs: the console on the PL011 (QEMU's
    mini UART interrupts without end once the console opens it: the kernel stalls); systemd's
    status on it (what shows multi-user.target reached, which `quiet` hides); no hardware watchdog
    (QEMU's BCM2835 PM block resets the machine the moment a watchdog is armed: it has no countdown)."""
    # the architecture's own serial console is the PL011 (QEMU's serial0)
    words = [f"console={plat.serial},115200" if w.startswith(f"console={boot.serial}") else w
             for w in cmdline.split()]
    return " ".join([*words, "systemd.show_status=1", "systemd.watchdog_sec=0"])


@dataclass
class ConsoleBoot:
    reached: bool  # multi-user.target reached
    seconds: float
    console: str
    disabled_nodes: list[str] = field(default_factory=list)


def raspi_command(image: Path, plat: Platform, board_boot: BoardBoot, work: Path,
                  serial: str) -> tuple[list[str], list[str]]:
    """QEMU's command line booting the image in raspi4b as its firmware would (kernel, initramfs,
    device tree and command line from its boot partition), the header's console on serial (a QEMU
    chardev), with an overlay over the image; and the device tree nodes disabled for QEMU."""
    qemu = qemu_with_raspi4b(plat)
    work.mkdir(parents=True, exist_ok=True)
    boot = partitions(image)[0]
    config = read_boot_file(image, boot, CONFIG_TXT, work / CONFIG_TXT).read_text()
    kernel = read_boot_file(image, boot, config_value(config, "kernel") or "", work / "kernel")
    initrd = read_boot_file(image, boot, config_value(config, "initramfs") or "", work / "initrd")
    dtb = read_boot_file(image, boot, board_boot.dtbs[0], work / "board.dtb")
    cmdline = read_boot_file(image, boot, CMDLINE_TXT, work / CMDLINE_TXT).read_text().strip()
    nodes = disable_not_modelled(dtb) + card_on_legacy_sdhci(dtb)
    sd = work / "sd.qcow2"
    sd.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image.resolve()), str(sd), SD_SIZE])
    cmd = [str(qemu), "-machine", MACHINE, "-kernel", str(kernel), "-initrd", str(initrd), "-dtb", str(dtb),
           "-append", qemu_cmdline(cmdline, board_boot, plat), "-drive", f"file={sd},if=sd,format=qcow2",
           "-serial", serial, "-serial", "null", "-display", "none"]
    return cmd, nodes


def boot_to_multi_user(image: Path, plat: Platform, boot: BoardBoot, work: Path, timeout: float = 600) -> ConsoleBoot:
    """Boot the image in raspi4b until the console shows multi-user.target reached, or timeout. The
    image is not modified."""
    console = work / "console.log"
    console.unlink(missing_ok=True)
    cmd, nodes = raspi_command(image, plat, boot, work, f"file:{console}")
    with open(work / "qemu.log", "wb") as qemu_log:
        return _watch([*cmd, "-monitor", "none"], Path(cmd[0]), qemu_log, console, re.compile(re.escape(REACHED)),
                      timeout, nodes)


def run_interactive(image: Path, plat: Platform, boot: BoardBoot, work: Path) -> int:
    """The raspi4b boot with the serial console on this terminal (Ctrl-A X quits)."""
    cmd, _ = raspi_command(image, plat, boot, work, "mon:stdio")
    return subprocess.call(cmd, env=_qemu_env(Path(cmd[0])))


def _watch(cmd: list[str], qemu: Path, qemu_log: IO[bytes], console: Path, prompt: re.Pattern[str], timeout: float,
           nodes: list[str]) -> ConsoleBoot:
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=qemu_log,
                            env=_qemu_env(qemu), start_new_session=True)

    def text() -> str:  # systemd colours its status: matched without the escapes
        return plain(console.read_text(errors="replace")) if console.exists() else ""

    try:
        while time.monotonic() - t0 < timeout and proc.poll() is None:
            if prompt.search(text()):
                break
            time.sleep(1)
        seen = text()
        return ConsoleBoot(bool(prompt.search(seen)), round(time.monotonic() - t0, 1), seen, nodes)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class RaspiResult:
    checks: dict[str, bool]  # check -> passed
    seconds: float = 0.0  # to multi-user.target
    console: str = ""


def prove_image(image: Path, name: str, boot: BoardBoot, plat: Platform, work: Path,
                timeout: float = 600) -> RaspiResult:
    """The boot partition's checks, then (if they pass) the raspi4b boot to multi-user.target."""
    work.mkdir(parents=True, exist_ok=True)
    problems = check_boot_partition(image, name, boot, work)
    checks = {f"boot partition: {p}": False for p in problems} or {"boot partition: firmware, config.txt, "
                                                                 "kernel, initramfs, device trees, cmdline.txt": True}
    if problems:
        return RaspiResult(checks)
    booted = boot_to_multi_user(image, plat, boot, work, timeout)
    checks[f"{MACHINE}: multi-user.target reached (serial console)"] = booted.reached
    failed = [u for u in failed_units(booted.console) if not u.startswith(FAILS_WITHOUT_ETHERNET)]
    checks["no unit failed while booting (but the health check, which needs Ethernet)"
           + (f": {', '.join(failed)}" if failed else "")] = not failed
    return RaspiResult(checks, booted.seconds, booted.console)


def plain(console: str) -> str:
    """The console's text without terminal escapes (systemd's colours)."""
    return re.sub(r"\x1b(?:\[[0-9;:?]*[a-zA-Z]|\][^\x07]*\x07)", "", console)


def failed_units(console: str) -> list[str]:
    """Units systemd's status on the console says failed to start (names as shown, maybe cut short)."""
    return sorted(set(re.findall(r"\[FAILED\] Failed to start (\S+)", plain(console))))
