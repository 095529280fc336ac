"""The disk's layout, and what the booted system must know about it.

  1 ESP     FAT32, 128 MiB: systemd-boot and one UKI per installed root, EFI/Linux/NAME-GEN-SLOT+TRIES.efi
  2 root-a  slot A: the read-only, compressed root (erofs), sized for growth
  3 root-b  slot B: empty in a fresh image (a hole: nothing in the .bmap or the .zst); an update
            writes the next root here, then the one after into A again
  4 data    ext4 mounted at /var: the state that outlives updates and rollbacks (SSH host keys, the
            journal, the health verdict, the dataplanes' state); grown to the end of the disk by
            systemd-repart at first boot

Every identifier is derived from the appliance's name: equal for every build of one appliance (an
update finds its partitions where the first image put them), different between appliances."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum

from ..dataplane.slots import BOOT_TRIES, ENTRIES, entry_name
from .platform import HOST

MiB = 1024 * 1024
ESP_SIZE = 128 * MiB  # FAT32 with room for two UKIs; OVMF ignores tiny FAT32 ESPs
SLOT_SIZE = 1024 * MiB  # a root slot: today's largest root (a generic board's, ~300 MiB) more than twice over
DATA_SIZE = 256 * MiB  # as built; systemd-repart grows it over whatever the disk has beyond the image
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
DATA_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # Linux generic: gpt-auto (masked) never mounts it
ROOT_FS_TYPE = "erofs"
# dpkg's database describes the root it came with: it stays in the (read-only) root, and /var/lib/dpkg
# points there (tmpfiles.d, at every boot: after an update, to the new root's)
DPKG_DB = "usr/lib/appliance/dpkg"
# /var's content is the data partition's: the root keeps /var as its mount point, and an empty
# /var/tmp, which services with PrivateTmp=disconnected (resolved) mount a tmpfs on when they start
# before /var is mounted
VAR_IN_ROOT = ("tmp",)
_NAMESPACE = uuid.UUID("6c3b0a53-0d1c-4c8e-9d0c-5a1e00000000")


class Slot(StrEnum):
    A = "a"
    B = "b"

    @property
    def number(self) -> int:
        """Its partition number (the ESP is 1)."""
        return 2 if self is Slot.A else 3

    @property
    def other(self) -> Slot:
        return Slot.B if self is Slot.A else Slot.A


@dataclass(frozen=True)
class DiskIds:
    """Stable identifiers: equal for every build of one appliance, different between appliances."""

    disk: str
    esp: str
    root_a: str
    root_b: str
    root_fs: str
    data_part: str
    data_fs: str
    esp_serial: str  # FAT volume id, 8 hex digits
    # baked into the read-only /etc (as mkosi does): the same on every update of this appliance, so
    # the journal and everything keyed by it survive updates; one profile is one device
    machine_id: str

    @classmethod
    def for_name(cls, name: str) -> DiskIds:
        def u(what: str) -> str:
            return str(uuid.uuid5(_NAMESPACE, f"{name}/{what}"))
        return cls(disk=u("disk"), esp=u("esp"), root_a=u("root-partition"), root_b=u("root-b-partition"),
                   root_fs=u("root-fs"), data_part=u("data-partition"), data_fs=u("data-fs"),
                   esp_serial=u("esp-fs").replace("-", "")[:8], machine_id=u("machine-id").replace("-", ""))

    def slot_partition(self, slot: Slot) -> str:
        return self.root_a if slot is Slot.A else self.root_b


@dataclass(frozen=True)
class Layout:
    esp_offset: int
    esp_size: int
    slot_size: int
    data_offset: int
    data_size: int
    disk_size: int

    def slot_offset(self, slot: Slot) -> int:
        return self.esp_offset + self.esp_size + (slot.number - 2) * self.slot_size


def layout() -> Layout:
    esp_off = 1 * MiB
    data_off = esp_off + ESP_SIZE + 2 * SLOT_SIZE
    backup_gpt = 1 * MiB
    return Layout(esp_off, ESP_SIZE, SLOT_SIZE, data_off, DATA_SIZE, data_off + DATA_SIZE + backup_gpt)


# tiny-initramfs finds a root by UUID only on ext4, XFS and btrfs, and knows no PARTUUID=: on the qemu
# board (one virtio disk) a slot is named by its device
VM_DISK = "/dev/vda"

# Boards that run under QEMU, where TCG (no KVM) may be all there is. The kernel live-patches its
# own code with a temporary int3 when a static key flips, and multi-threaded TCG may still run the
# breakpoint on the other vCPU: "Oops: int3", a panic (see verify.boot.emulator_fault). One such flip
# comes late, among running services: kernel-memory accounting switched on when systemd enables its
# first memory cgroup, in the slab allocator's fast paths (kfree). Without kmem accounting that key
# never flips; memory limits still count user memory.
_VM_CMDLINE = " cgroup.memory=nokmem"


def kernel_cmdline(ids: DiskIds, slot: Slot = Slot.A, vm: bool = False, serial: str = HOST.serial) -> str:
    # serial last: it becomes /dev/console, which is what headless boxes and QEMU show.
    # quiet: the kernel's boot log goes to the journal, not byte by byte through a (slow) serial
    # port; systemd still shows failed and slow units on the console.
    # ro: the root is erofs; the UKI of each slot names that slot
    root = f"{VM_DISK}{slot.number}" if vm else f"PARTUUID={ids.slot_partition(slot)}"
    # fsck.repair=yes: nobody is there to answer fsck's questions; what /var holds is made again
    return (f"root={root} rootfstype={ROOT_FS_TYPE} ro rootwait panic=10 fsck.repair=yes quiet console=tty0 "
            f"console={serial},115200" + (_VM_CMDLINE if vm else ""))


def uki_entry(name: str, generation: int = 1, slot: Slot = Slot.A, tries: int | None = BOOT_TRIES) -> str:
    """The UKI's file name on the ESP: NAME-GENERATION-SLOT+TRIES.efi. systemd-boot reads boot
    counting's +TRIES from it, and of the entries with tries left boots the one whose name sorts
    highest as a version: each update's root gets the next generation (the device's
    `appliance-dataplane slot install` names it). tries=None: the name once blessed."""
    return f"{ENTRIES}/{entry_name(name, generation, str(slot), tries)}"


def system_files(ids: DiskIds) -> dict[str, str]:
    """Files of the root tree that name this disk's partitions (path -> text)."""
    return {
        # ext4's journal covers a power cut; fsck (pass 2, systemd-fsck@) repairs what the kernel
        # marked as errors (a failing SD card), else a clean file system costs one superblock read
        "etc/fstab": (f"# /var: the data partition, grown to the disk's end at first boot\n"
                      f"PARTUUID={ids.data_part} /var ext4 defaults,noatime,nosuid,nodev 0 2\n"),
        "etc/machine-id": f"{ids.machine_id}\n",
        # The ESP on /efi, mounted for systemd-bless-boot only (after the boot is complete, off the
        # tunnel's way up): it renames the entry systemd-boot counted. Nothing else mounts it.
        "etc/systemd/system/efi.mount": (
            "[Unit]\nDescription=EFI System Partition (boot counting)\n"
            "Documentation=man:systemd-bless-boot.service(8)\n\n"
            f"[Mount]\nWhat=/dev/disk/by-partuuid/{ids.esp}\nWhere=/efi\nType=vfat\n"
            "Options=umask=0077,noatime,nosuid,nodev,noexec\n"),
        "etc/systemd/system/systemd-bless-boot.service.d/10-appliance-esp.conf":
            "[Unit]\n# the ESP holds the entry it renames\nRequires=efi.mount\nAfter=efi.mount\n",
    }
