"""The Raspberry Pi's boot partition: what the Pi's own firmware reads instead of UEFI.

  partition 1 (FAT32, where other boards have the ESP): the firmware's start4*.elf and fixup4*.dat
  (Debian's raspi-firmware, non-free-firmware), config.txt (64-bit, the mainline device tree, the
  kernel and initramfs by name), cmdline.txt (the root slot by PARTUUID), the kernel, the initramfs
  and the device trees of the board's models (the firmware loads the one for the model it runs on).

The files are those Debian's raspi-firmware hook would copy, written at build time from the cached
base tree and the unpacked firmware package: the root tree itself has no hook and no /boot/firmware.
The Pi has no boot counting: slot A is what boots (updates in the field need the Pi's tryboot, not
done yet)."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from .assemble import mkfs_fat
from .disk import DiskIds
from .platform import BoardBoot
from .run import BuildLog, ImageError
from .tools import ToolsTree

CONFIG_TXT = "config.txt"
CMDLINE_TXT = "cmdline.txt"


def config_txt(name: str, kernel: str, initrd: str) -> str:
    # enable_uart: the serial header's console (the mini UART, at a fixed core clock);
    # upstream_kernel: the firmware loads the mainline device tree names Debian's kernel ships
    return (f"# {name}: read by the Raspberry Pi firmware; written by appliance build\n"
            "arm_64bit=1\n"
            "enable_uart=1\n"
            "upstream_kernel=1\n"
            f"kernel={kernel}\n"
            f"initramfs {initrd}\n")


def boot_files(boot: BoardBoot, firmware: Path, kernel: Path, initrd: Path, dtb_dir: Path, cmdline: str,
               name: str) -> dict[str, Path | str]:
    """Name on the partition -> a file to copy, or a text to write."""
    files: dict[str, Path | str] = {}
    for pattern in boot.firmware_files:
        found = sorted((firmware / boot.firmware_dir.lstrip("/")).glob(pattern))
        if not found:  # a board whose firmware would not start: stop here, not on the device
            raise ImageError(f"no {pattern} in {', '.join(boot.firmware_packages)} ({boot.firmware_dir})")
        for f in found:
            files[f.name] = f
    for dtb in boot.dtbs:
        files[dtb] = dtb_dir / dtb
    files[kernel.name] = kernel
    files[initrd.name] = initrd
    files[CONFIG_TXT] = config_txt(name, kernel.name, initrd.name)
    files[CMDLINE_TXT] = cmdline + "\n"
    return files


def build_rpi_boot(tools: ToolsTree, files: dict[str, Path | str], out: Path, ids: DiskIds, size: int, sde: int,
                   log: BuildLog) -> None:
    stage = out.with_name("boot-files")
    stage.mkdir()
    try:
        for name, src in sorted(files.items()):
            dst = stage / name
            if isinstance(src, str):
                dst.write_text(src)
            else:
                if not src.is_file():
                    raise FileNotFoundError(2, "a file the Pi's boot partition needs is missing", str(src))
                shutil.copyfile(src, dst)
            os.utime(dst, (sde, sde))  # mcopy -m keeps it
        names = " ".join(shlex.quote(str(stage / n)) for n in sorted(files))
        script = f"{mkfs_fat(out, 'BOOT', ids, size)} && mcopy -m -i {out} {names} ::/"
        tools.run(["sh", "-c", script], binds=[out.parent], log=log, what="Pi boot partition (mkfs.vfat, mtools)",
                  env={"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(sde)})
    finally:
        shutil.rmtree(stage, ignore_errors=True)
