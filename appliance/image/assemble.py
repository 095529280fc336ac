"""Assembly: a GPT disk image on a plain file, without loop devices or mounts.

  ESP (FAT32, mkfs.vfat --invariant, filled with mtools): systemd-boot as EFI/BOOT/BOOTX64.EFI and
      the Unified Kernel Image (kernel + initramfs + command line naming root=UUID=...) as
      EFI/Linux/NAME+TRIES.efi: systemd-boot counts the tries down, the booted system blesses the
      entry once appliance-health has passed (boot-complete.target, systemd-bless-boot)
  root (ext4, mkfs.ext4 -d from the staged tree, fixed UUID and hash seed)
  GPT laid out by sfdisk with GUIDs derived from the appliance name.

Everything runs in the trixie tools tree (ukify, e2fsprogs >= 1.47, mtools); every timestamp is
SOURCE_DATE_EPOCH, so the same tree gives the same bytes."""

from __future__ import annotations

import errno
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from .run import BuildLog
from .tools import ToolsTree

MiB = 1024 * 1024
ESP_SIZE = 128 * MiB  # FAT32 with room for two UKIs; OVMF ignores tiny FAT32 ESPs
ROOT_FREE = 256 * MiB  # headroom for logs and state on the device
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
_NAMESPACE = uuid.UUID("6c3b0a53-0d1c-4c8e-9d0c-5a1e00000000")


@dataclass(frozen=True)
class DiskIds:
    """Stable identifiers: equal for every build of one appliance, different between appliances."""

    disk: str
    esp: str
    root_part: str
    root_fs: str
    esp_serial: str  # FAT volume id, 8 hex digits

    @classmethod
    def for_name(cls, name: str) -> DiskIds:
        def u(what: str) -> str:
            return str(uuid.uuid5(_NAMESPACE, f"{name}/{what}"))
        return cls(u("disk"), u("esp"), u("root-partition"), u("root-fs"), u("esp-fs").replace("-", "")[:8])


# Boards that run under QEMU, where TCG (no KVM) may be all there is. The kernel live-patches its
# own code with a temporary int3 when a static key flips, and multi-threaded TCG may still run the
# breakpoint on the other vCPU: "Oops: int3", a panic (see verify.boot.emulator_fault). One such flip
# comes late, among running services: kernel-memory accounting switched on when systemd enables its
# first memory cgroup, in the slab allocator's fast paths (kfree). Without kmem accounting that key
# never flips; memory limits still count user memory.
_VM_CMDLINE = " cgroup.memory=nokmem"


def kernel_cmdline(ids: DiskIds, vm: bool = False) -> str:
    # serial last: it becomes /dev/console, which is what headless boxes and QEMU show.
    # quiet: the kernel's boot log goes to the journal, not byte by byte through a (slow) serial
    # port; systemd still shows failed and slow units on the console.
    # root=UUID=: the file system's UUID, which both initramfs implementations understand (tiny-initramfs
    # has no PARTUUID=); it is fixed per appliance name, like the partition's.
    return (f"root=UUID={ids.root_fs} rw rootwait panic=10 quiet console=tty0 console=ttyS0,115200"
            + (_VM_CMDLINE if vm else ""))


@dataclass(frozen=True)
class Layout:
    esp_offset: int
    esp_size: int
    root_offset: int
    root_size: int
    disk_size: int


def layout_for(tree_bytes: int) -> Layout:
    root = _round_up(int(tree_bytes * 1.15) + ROOT_FREE, 16 * MiB)
    esp_off = 1 * MiB
    root_off = esp_off + ESP_SIZE
    return Layout(esp_off, ESP_SIZE, root_off, root, root_off + root + 1 * MiB)  # +1 MiB: backup GPT


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def build_uki(tools: ToolsTree, kernel: Path, initrd: Path, os_release: Path, cmdline: str, out: Path,
              sde: int, log: BuildLog) -> None:
    version = kernel.name.removeprefix("vmlinuz-")
    tools.run(["ukify", "build", f"--linux={kernel}", f"--initrd={initrd}", f"--cmdline={cmdline}",
               f"--os-release=@{os_release}", f"--uname={version}",
               "--stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub", f"--output={out}"],
              binds=[kernel.parent, os_release.parent, out.parent], log=log, what="ukify",
              env={"SOURCE_DATE_EPOCH": str(sde)})
    os.utime(out, (sde, sde))


BOOT_TRIES = 3  # boots a new entry gets before systemd-boot stops choosing it
SYSTEMD_BOOT = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi"  # in the tools tree (systemd-boot-efi)
# no menu (timeout 0: a key held at boot still shows it), no editing of the kernel command line
# (it would let anyone at the console boot into a shell), nothing but the appliance's own entries
LOADER_CONF = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n"


def uki_entry(name: str, tries: int = BOOT_TRIES) -> str:
    """The UKI's file name on the ESP: systemd-boot's boot counting reads +TRIES from it."""
    return f"EFI/Linux/{name}+{tries}.efi"


def esp_mount_units(ids: DiskIds) -> dict[str, str]:
    """The ESP on /efi, mounted for systemd-bless-boot only (after the boot is complete, off the
    tunnel's way up): it renames the entry systemd-boot counted. Nothing else mounts it."""
    return {
        "etc/systemd/system/efi.mount": (
            "[Unit]\nDescription=EFI System Partition (boot counting)\n"
            "Documentation=man:systemd-bless-boot.service(8)\n\n"
            f"[Mount]\nWhat=/dev/disk/by-partuuid/{ids.esp}\nWhere=/efi\nType=vfat\n"
            "Options=umask=0077,noatime,nosuid,nodev,noexec\n"),
        "etc/systemd/system/systemd-bless-boot.service.d/10-appliance-esp.conf":
            "[Unit]\n# the ESP holds the entry it renames\nRequires=efi.mount\nAfter=efi.mount\n",
    }


def build_esp(tools: ToolsTree, uki: Path, out: Path, ids: DiskIds, size: int, sde: int, log: BuildLog,
              entry: str) -> None:
    conf = out.with_name("loader.conf")
    conf.write_text(LOADER_CONF)
    os.utime(conf, (sde, sde))  # mcopy -m keeps it
    script = (
        f"mkfs.vfat -F 32 -n ESP -i {ids.esp_serial} --invariant -C {out} {size // 1024} >/dev/null && "
        f"mmd -i {out} ::/EFI ::/EFI/BOOT ::/EFI/Linux ::/loader && "
        f"mcopy -m -i {out} {SYSTEMD_BOOT} ::/EFI/BOOT/BOOTX64.EFI && "
        f"mcopy -m -i {out} {conf} ::/loader/loader.conf && "
        f"mcopy -m -i {out} {uki} ::/{entry}")
    # mtools stamps the directories it makes with SOURCE_DATE_EPOCH instead of the time of the build
    try:
        tools.run(["sh", "-c", script], binds=[out.parent, uki.parent], log=log, what="ESP (mkfs.vfat, mtools)",
                  env={"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(sde)})
    finally:
        conf.unlink(missing_ok=True)


def build_root_fs(tools: ToolsTree, tree: Path, out: Path, ids: DiskIds, size: int, sde: int, log: BuildLog) -> None:
    tools.run(["mkfs.ext4", "-q", "-L", "root", "-U", ids.root_fs,
               "-E", f"hash_seed={ids.root_fs},root_owner=0:0", "-d", tree, out, f"{size // 1024}K"],
              binds=[tree, out.parent], log=log, what="mkfs.ext4 -d",
              env={"E2FSPROGS_FAKE_TIME": str(sde), "SOURCE_DATE_EPOCH": str(sde)})


def write_disk(tools: ToolsTree, out: Path, esp: Path, root: Path, lay: Layout, ids: DiskIds, log: BuildLog) -> None:
    """Partition table on a sparse file, then the two file systems copied in at their offsets. The
    file is 0600 from its first byte: it will hold the appliance's private key."""
    with open(private_file(out), "wb") as f:
        f.truncate(lay.disk_size)
    table = (
        "label: gpt\n"
        f"label-id: {ids.disk}\n"
        "first-lba: 2048\n"
        f"start={lay.esp_offset // 512}, size={lay.esp_size // 512}, type={ESP_TYPE}, uuid={ids.esp}, name=esp\n"
        f"start={lay.root_offset // 512}, size={lay.root_size // 512}, type={ROOT_X86_64_TYPE}, "
        f"uuid={ids.root_part}, name=root\n"
    )
    tools.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", out], binds=[out.parent], log=log, what="sfdisk",
              input=table)
    copy_sparse(esp, out, lay.esp_offset)
    copy_sparse(root, out, lay.root_offset)


def private_file(path: Path) -> int:
    """A new (or emptied) file that only its owner can read, from the moment it exists; an fd for open()."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # it may have existed with another mode
    return fd


def copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy only the data extents of src into dst at offset (SEEK_DATA/SEEK_HOLE), keeping dst sparse."""
    with open(src, "rb") as fi, open(dst, "r+b") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break  # only a hole remains
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            _copy_range(fi.fileno(), fo.fileno(), start, end, offset)
            pos = end


def _copy_range(fi: int, fo: int, start: int, end: int, offset: int) -> None:
    while start < end:
        length = min(end - start, 16 * MiB)
        try:
            n = os.copy_file_range(fi, fo, length, start, start + offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            # copy_file_range refuses some pairs of file systems: copy through user space
            data = os.pread(fi, length, start)
            n = os.pwrite(fo, data, start + offset)
        if n == 0:
            raise OSError(errno.EIO, "short copy while assembling the disk image")
        start += n
