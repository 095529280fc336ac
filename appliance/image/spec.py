"""ImageSpec: what the image's base tree is made of (packages, kernel, initramfs, units), derived from
the profile. It is all the image stage learns about the profile besides the ConfigTree, and it is
what keys the cached base tree: two profiles with equal specs share one base."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from ..profile.model import Profile
from ..render.renderer import appliance_units, enabled_units
from .platform import HOST, BoardBoot, Platform, board_boot, platform


class Arch(StrEnum):
    AMD64 = "amd64"
    ARM64 = "arm64"


class Board(StrEnum):
    GENERIC = "generic"  # real hardware: the full kernel, initramfs-tools
    QEMU = "qemu"  # virtual machines: the cloud kernel, tiny-initramfs
    RPI4 = "rpi4"  # Raspberry Pi 4/400/CM4: the full kernel, initramfs-tools, booted by the Pi's firmware


class Initramfs(StrEnum):
    TINY = "tiny-initramfs"
    TOOLS = "initramfs-tools"


BASE_PACKAGES = [
    "systemd", "systemd-sysv", "systemd-resolved", "udev", "dbus", "openssh-server", "nftables", "iproute2",
    "ethtool", "kmod", "login", "linux-sysctl-defaults", "zstd", "python3", "python3-pyroute2",
    # systemd-bless-boot and its generator: a boot systemd-boot counts is marked good after
    # boot-complete.target (which appliance-health.service gates)
    "systemd-boot",
    # grows the data partition over the rest of the disk at first boot
    "systemd-repart",
    # e2fsck, which systemd-fsck runs on the data partition before /var is mounted
    "e2fsprogs",
]
# The initramfs only has to find the root file system. Hardware gets initramfs-tools with its "most"
# (every storage driver, udev). A VM gets tiny-initramfs: one static init that loads the modules below
# (the cloud kernel has virtio-pci and NVMe built in) and mounts the root slot; no udev, no shell,
# 0.5 MiB instead of 7 MiB: ~4 s less of unpacking and initramfs under emulation. The root disk is
# virtio-blk or NVMe (virtio-scsi and AHCI cost 1.3 s more here). virtio_net: the NICs exist when udev
# starts in the root, so its coldplug (which handles net first) names them before anything else.
# Then the VM's watchdog where the platform has one (Platform.vm_watchdog: QEMU -device i6300esb), there
# before PID 1 starts so that systemd arms it (RuntimeWatchdogSec=) at once; a driver that appears
# later is not picked up.
VM_INITRD_MODULES = ["virtio_blk", "virtio_net"]
# The root file system's driver (disk.ROOT_FS_TYPE), which both initramfs implementations load first.
ROOT_FS_MODULES = ["erofs"]
INITRAMFS_VM = Initramfs.TINY
VM_BOARD = Board.QEMU  # the board that boots in virtual machines: cloud kernel, tiny initramfs
INITRAMFS_HARDWARE = Initramfs.TOOLS
# What initramfs-tools puts into a hardware image's initramfs: its own module classes (hook-functions'
# auto_add_modules), every one its MODULES=most takes but "net", NIC drivers for a root on NFS. The
# root is on a local disk; udev loads NIC drivers from it. They were a third of the initramfs
# (9.7 of 28 MB on arm64). Kept: every storage class (SATA, SCSI, NVMe, MMC, USB storage, virtio)
# and "base" (USB hosts, keyboards, the SoC buses, clocks and regulators ARM boards need first).
INITRD_CLASSES_HARDWARE = ["base", "ide", "scsi", "block", "ata", "dasd", "firewire", "mmc", "usb_storage", "fb"]
# Module subtrees an edge router never loads (paths under /usr/lib/modules/VERSION/kernel/), as mkosi's
# KernelModulesExclude=: cluster and network file systems, RDMA, lab hardware. Kept: all of net/
# (nftables, WireGuard, tunnels), block and NIC drivers, ext4/vfat/overlay, 9p.
MODULES_EXCLUDE_ALL = [
    "drivers/infiniband", "drivers/comedi", "drivers/target", "fs/bcachefs", "fs/ceph", "fs/ocfs2", "fs/gfs2",
    "fs/dlm", "fs/nfsd", "fs/orangefs", "fs/coda", "fs/afs", "net/ceph", "net/tipc", "net/smc", "net/rds",
    # an appliance hosts no VMs and talks to no hypervisor over vsock; udev would load these at boot
    "arch/x86/kvm", "drivers/misc/vmw_vmci", "net/vmw_vsock",
]
MODULES_EXCLUDE_VM = [
    "drivers/md", "drivers/nvdimm", "drivers/media", "drivers/gpu", "fs/btrfs", "fs/xfs", "fs/smb", "fs/nfs",
    "fs/ntfs3", "fs/jfs", "fs/f2fs", "fs/nilfs2", "fs/reiserfs", "net/sunrpc", "sound",
    "drivers/cdrom", "drivers/scsi/sr_mod.ko.xz",  # QEMU's q35 has a CD drive; the appliance boots from disk
]
# On hardware, kinds of device an edge router has no use for (and drivers for which Debian's image
# ships no firmware): sound, graphics and video capture, Wi-Fi and Bluetooth, NFC, industrial
# sensors, staging drivers, input devices beyond keyboards and mice; and the file systems of the VM
# list. Kept: every wired NIC (PCI, USB, Thunderbolt), storage, USB, HID, netfilter, crypto,
# tun/WireGuard, watchdogs, hwmon. system.kernel_modules keeps named modules (and what they need).
MODULES_EXCLUDE_HARDWARE = [
    "sound", "drivers/gpu", "drivers/media", "drivers/staging", "drivers/iio", "drivers/net/wireless",
    "drivers/bluetooth", "net/bluetooth", "drivers/nfc", "net/nfc", "drivers/input/joystick",
    "drivers/input/tablet", "drivers/input/touchscreen", "fs/btrfs", "fs/xfs", "fs/smb", "fs/nfs", "fs/ntfs3",
    "fs/jfs", "fs/f2fs", "fs/nilfs2", "fs/reiserfs", "net/sunrpc",
    # storage networks: the appliance boots from its own disk and serves no storage (Fibre Channel,
    # FCoE and iSCSI-offload HBAs, which also pull in their vendors' 25-100G NIC cores, and the NVMe-oF
    # target); SAS/SATA/NVMe/MMC/USB controllers, software iSCSI and Hyper-V's storage stay
    "drivers/scsi/lpfc", "drivers/scsi/qla2xxx", "drivers/scsi/qla4xxx", "drivers/scsi/bfa", "drivers/scsi/fnic",
    "drivers/scsi/snic", "drivers/scsi/csiostor", "drivers/scsi/qedf", "drivers/scsi/qedi", "drivers/scsi/bnx2fc",
    "drivers/scsi/bnx2i", "drivers/scsi/be2iscsi", "drivers/scsi/cxgbi", "drivers/scsi/fcoe", "drivers/scsi/libfc",
    "drivers/nvme/target",
    # networks nobody routes WireGuard over any more, or whose radios are left out (ISDN, PCI ATM
    # adapters, ARCnet, FDDI, packet radio, 802.15.4, CAN bus; the Wi-Fi stack without its drivers);
    # USB DSL modems' ATM stack (net/atm), WAN cards and LTE modems (drivers/net/wwan) stay
    "drivers/isdn", "drivers/atm", "drivers/net/arcnet", "drivers/net/fddi", "drivers/net/hamradio",
    "drivers/net/ieee802154", "net/ieee802154", "net/mac802154", "drivers/net/can", "net/can", "net/wireless",
    "net/mac80211",
    # AI accelerators, and framebuffers and backlights (video, like drivers/gpu)
    "drivers/accel", "drivers/video",
]
# Modules nothing here uses, which would still be loaded at every boot (each load costs ~0.2 s of CPU
# under emulation). systemd loads autofs4 and ip_tables itself: the appliance has no automount and
# uses nftables. In a VM, udev would load the CPU's crypto accelerators (the kernel's own crypto
# users here, WireGuard and module signatures, do not use them) and AHCI for QEMU's SATA/CD
# controller (the root disk is virtio or NVMe). blacklist stops loading by alias (udev, systemd), not
# an explicit modprobe of a module or its dependencies.
MODULES_BLACKLIST_ALL = ["autofs4", "ip_tables"]
MODULES_BLACKLIST_VM = ["ahci", "sg", "serio_raw", "aesni_intel", "ghash_clmulni_intel", "polyval_clmulni",
                        "sha1_ssse3", "sha256_ssse3", "sha512_ssse3", "crc32_pclmul", "crct10dif_pclmul"]
# Timers and units an appliance does not need; fewer units, faster boot.
DISABLED_UNITS = ["apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
                  "e2scrub_reap.service", "fstrim.timer", "man-db.timer"]


@dataclass(frozen=True)
class ImageSpec:
    name: str
    arch: Arch
    board: Board
    kernel_package: str
    packages: tuple[str, ...]  # everything installed explicitly, kernel included, sorted
    extra_packages: tuple[str, ...]  # the profile's own, for error messages
    initramfs: Initramfs  # the Debian package that makes it
    initrd_modules: tuple[str, ...]  # besides initramfs-tools' classes, or all tiny-initramfs loads
    modules_exclude: tuple[str, ...]  # kernel module subtrees left out of the image
    modules_blacklist: tuple[str, ...]  # modules never loaded by alias (udev, systemd)
    enable_units: tuple[str, ...]  # Debian's, enabled in the base tree
    disable_units: tuple[str, ...]
    appliance_units: tuple[str, ...] = ()  # the appliance's own, enabled by the rendered tree
    netstack: bool = False  # the userspace dataplane's binary, compiled from Go and added to the tree
    modules_keep: tuple[str, ...] = ()  # system.kernel_modules: kept (with their dependencies) in spite of excludes
    initrd_classes: tuple[str, ...] = ()  # initramfs-tools' module classes (MODULES=list and a hook); none: tiny
    # after the excludes, modules left without one they depend on go too (orphan_modules): in a
    # hardware image, where any device may match their aliases (a VM's devices are known)
    prune_orphan_modules: bool = False

    @property
    def vm(self) -> bool:
        return self.board == VM_BOARD

    @property
    def platform(self) -> Platform:
        return platform(self.arch)

    @property
    def emulated(self) -> bool:
        """Built on this host through qemu-user: the tree's programs are of another architecture."""
        return self.platform != HOST

    @property
    def emulator_env(self) -> dict[str, str]:
        """What a command that runs the tree's programs adds to its environment (qemu-user's CPU)."""
        return self.platform.user_env if self.emulated else {}

    @property
    def boot(self) -> BoardBoot:
        return board_boot(self.board)

    @property
    def serial(self) -> str:
        """The kernel's serial console: the board's, else its architecture's."""
        return self.boot.serial or self.platform.serial

    def base_inputs(self) -> dict[str, Any]:
        """The parts that decide the base tree's content (the name does not, nor which hardware board:
        a board decides the tree only through the kernel, initramfs and module lists, which are here;
        its boot files are made outside the tree). So rpi4 and arm64 generic share one tree."""
        d = asdict(self)
        d.pop("name")
        # the field keeps its form, so trees cached before stay valid
        d["board"] = VM_BOARD if self.vm else Board.GENERIC
        d.pop("extra_packages")
        d.pop("appliance_units")
        d.pop("netstack")
        # as before the field existed: cached trees stay valid
        for late in ("modules_keep", "initrd_classes", "prune_orphan_modules"):
            if not d[late]:
                d.pop(late)
        return d


def vm_initrd_modules(plat: Platform) -> list[str]:
    return VM_INITRD_MODULES + ([plat.vm_watchdog] if plat.vm_watchdog else [])


def image_spec(p: Profile) -> ImageSpec:
    packages = set(BASE_PACKAGES)
    if p.kernel_mode:
        packages.add("wireguard-tools")  # `wg`; the module ships with the kernel
    if p.wireguard_go_tun:
        packages.add("wireguard-go")
    if p.userspace:
        packages.add("wireguard-tools")  # `wg show` reads the userspace dataplane's UAPI socket too
    vm = p.system.board == VM_BOARD
    # Debian's full kernel drives the Pi 4 (device trees, SD/eMMC, GENET Ethernet, PCIe USB)
    kernel = f"linux-image-cloud-{p.system.arch}" if vm else f"linux-image-{p.system.arch}"
    packages.add(kernel)
    initramfs = INITRAMFS_VM if vm else INITRAMFS_HARDWARE
    packages.add(initramfs)
    packages |= set(p.system.packages)
    return ImageSpec(
        name=p.name,
        arch=Arch(p.system.arch),
        board=Board(p.system.board),
        kernel_package=kernel,
        packages=tuple(sorted(packages)),
        extra_packages=tuple(sorted(p.system.packages)),
        initramfs=initramfs,
        initrd_modules=tuple(ROOT_FS_MODULES + (vm_initrd_modules(platform(p.system.arch)) if vm else [])),
        modules_exclude=tuple(MODULES_EXCLUDE_ALL + (MODULES_EXCLUDE_VM if vm else MODULES_EXCLUDE_HARDWARE)),
        modules_blacklist=tuple(MODULES_BLACKLIST_ALL + (MODULES_BLACKLIST_VM if vm else [])),
        enable_units=tuple(enabled_units(p)),
        disable_units=tuple(DISABLED_UNITS),
        appliance_units=tuple(appliance_units(p)),
        netstack=p.userspace,
        modules_keep=tuple(sorted(set(p.system.kernel_modules))),
        initrd_classes=() if vm else tuple(INITRD_CLASSES_HARDWARE),
        prune_orphan_modules=not vm,
    )
