"""Everything that differs by CPU architecture or board, in two tables that the build and the lab
read. Per architecture: Debian's and UEFI's names for it, the root partition's GPT type, the EFI
binaries, the serial console, and how QEMU emulates it. Per board: how it boots (UEFI or the
Raspberry Pi's firmware), the firmware and device trees that boot needs, its serial console. Nothing
else in appliance names an architecture or a board's hardware."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Platform:
    arch: str  # Debian's name (system.arch)
    uefi: str  # UEFI's suffix for it: BOOTX64.EFI, systemd-bootx64.efi, linuxx64.efi.stub
    multiarch: str  # Debian's multiarch triplet (/usr/lib/TRIPLET)
    root_type: str  # GPT type of its root partitions (UAPI Discoverable Partitions Specification)
    serial: str  # the kernel's serial console on QEMU's machine (and most boards)
    qemu: str  # QEMU's system emulator
    qemu_machine: str  # its machine type for a lab VM
    firmware_arch: str  # the architecture's name in QEMU's firmware descriptors
    firmware_machine: str  # a machine type those descriptors list
    tcg_cpu: str  # the CPU QEMU emulates without KVM
    buildable: bool  # whether images can be built for it yet
    # the watchdog a lab VM gets (QEMU -device, and the driver the VM image's initramfs loads for
    # it), or "" where QEMU's machine and Debian's cloud kernel have none in common
    vm_watchdog: str = ""
    # the disk a lab VM of a generic (hardware) image boots from: "ahci" (SATA) or "nvme"
    hardware_disk: str = "ahci"
    # the CPU qemu-user emulates for a tree's programs at build time (QEMU_CPU), where its default
    # ("max") costs time for nothing the build needs
    user_cpu: str = ""

    @property
    def user_env(self) -> dict[str, str]:
        """The environment that makes qemu-user emulate user_cpu (for programs of this architecture)."""
        return {"QEMU_CPU": self.user_cpu} if self.user_cpu else {}

    @property
    def goarch(self) -> str:
        """Go's name for it (GOARCH): Debian's, for every architecture in this table."""
        return self.arch

    @property
    def uki_stub(self) -> str:
        """The systemd EFI stub a UKI is built on (in the tools tree: systemd-boot-efi)."""
        return f"/usr/lib/systemd/boot/efi/linux{self.uefi}.efi.stub"

    @property
    def systemd_boot(self) -> str:
        return f"/usr/lib/systemd/boot/efi/systemd-boot{self.uefi}.efi"

    @property
    def fallback_loader(self) -> str:
        """Where UEFI firmware looks on a removable (or any unregistered) disk."""
        return f"/EFI/BOOT/BOOT{self.uefi.upper()}.EFI"


PLATFORMS = {
    "amd64": Platform("amd64", "x64", "x86_64-linux-gnu", "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709", "ttyS0",
                      # la57=off: with 5-level paging (which TCG's "max" CPU offers) the guest's reboot
                      # hangs after "reboot: Restarting system" under OVMF; an update reboots the guest
                      "qemu-system-x86_64", "q35,smm=off", "x86_64", "pc-q35-7.2", "max,la57=off", buildable=True,
                      vm_watchdog="i6300esb"),
    # no watchdog in the lab: Debian's arm64 cloud kernel has no i6300esb driver, and QEMU's virt
    # machine has no watchdog of its own (the SBSA watchdog comes with sbsa-ref only)
    # a generic image's lab disk is NVMe: Debian's AAVMF has no AHCI boot driver (it stops in its
    # shell), and arm64 servers and boards boot from NVMe, SD or eMMC rather than SATA
    # tcg_cpu: "max" without pointer authentication (kernel and programs use it on every call and
    # return where the CPU has it; most arm64 boards' CPUs, the Pi 4's among them, do not): the arm64
    # exit node's first handshake in the lab 34.8 -> 16.2 s, SSH 57.4 -> 24.2 s; the generic image's
    # (full kernel, NVMe, e1000e) 100-150 s -> 25.9 s
    # user_cpu: "max" emulates pointer authentication (PAC, which Debian's arm64 binaries use) with
    # its full cipher at every call and return: the build's Python and perl ran 1.7-2.2x faster as a
    # Cortex-A72 (the Pi 4's CPU, the armv8.0 baseline Debian builds for; PAC instructions are NOPs
    # there), and what they write does not depend on the CPU
    "arm64": Platform("arm64", "aa64", "aarch64-linux-gnu", "B921B045-1DF0-41C3-AF44-4C6F280D3FAE", "ttyAMA0",
                      "qemu-system-aarch64", "virt", "aarch64", "virt-7.2", "max,pauth=off", buildable=True,
                      hardware_disk="nvme", user_cpu="cortex-a72"),
}
HOST = PLATFORMS["amd64"]  # what builds run on (the tools tree) and the lab's default


def platform(arch: str) -> Platform:
    try:
        return PLATFORMS[arch]
    except KeyError:
        raise ValueError(f"no platform for architecture {arch!r} (known: {', '.join(PLATFORMS)})") from None


@dataclass(frozen=True)
class BoardBoot:
    """How a board's firmware finds the kernel: "uefi" (systemd-boot and a UKI per root slot on an
    ESP, boot counting) or "rpi" (the Pi's firmware reads config.txt, cmdline.txt, the kernel, the
    initramfs and the board's device tree from the first FAT partition; no boot counting)."""

    kind: str
    # Debian packages (non-free-firmware) whose files the firmware loads, unpacked onto the boot partition
    firmware_packages: tuple[str, ...] = ()
    firmware_dir: str = ""  # where those packages keep them
    firmware_files: tuple[str, ...] = ()  # globs in firmware_dir: what this board's firmware loads
    dtb_dir: str = ""  # under /usr/lib/linux-image-VERSION/
    # the device trees of the board's models (the firmware picks by model); the first is the model
    # QEMU emulates, if it does
    dtbs: tuple[str, ...] = ()
    serial: str = ""  # the console on the board's serial header, where not the architecture's
    part_type: str = ""  # GPT type of the boot partition, where not the ESP's


UEFI_BOOT = BoardBoot("uefi")
BOARD_BOOT = {
    "generic": UEFI_BOOT,
    "qemu": UEFI_BOOT,
    # Pi 4 B, Pi 400, CM4: the EEPROM boot loader reads start4.elf/fixup4.dat from the first FAT
    # partition, GPT or MBR; the variants (start4x: camera and codecs, start4db: debug, start4cd: for
    # gpu_mem=16) only when config.txt asks for them, which the appliance's does not (5 MiB less).
    # The serial header's UART is the mini UART (ttyS1 with the mainline device tree; the PL011
    # serves Bluetooth).
    "rpi4": BoardBoot("rpi", ("raspi-firmware",), "/usr/lib/raspi-firmware", ("start4.elf", "fixup4.dat"),
                      "broadcom", ("bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb", "bcm2711-rpi-cm4-io.dtb"),
                      # Microsoft basic data, as Raspberry Pi's own GPT images have it: the EEPROM's
                      # reading of ESP-typed partitions has had bugs (rpi-eeprom #359, #558)
                      serial="ttyS1", part_type="EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"),
}


def board_boot(board: str) -> BoardBoot:
    return BOARD_BOOT[board]
