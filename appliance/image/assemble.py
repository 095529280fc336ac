"""Assembly: a GPT disk image on a plain file, without loop devices or mounts (layout: disk.py).

  ESP (FAT32, mkfs.vfat --invariant, filled with mtools): systemd-boot as the firmware's fallback
      loader (EFI/BOOT/BOOT<arch>.EFI) and the Unified Kernel Image (kernel + initramfs + command
      line naming slot A's root) as EFI/Linux/NAME-1-a+TRIES.efi: systemd-boot counts the tries
      down, the booted system blesses the entry once appliance-health has passed
      (boot-complete.target, systemd-bless-boot)
  root in slot A (erofs, mkfs.erofs from the staged tree without /var's content, fixed UUID and time)
  data (ext4, mkfs.ext4 -d from the staged tree's /var, fixed UUID and hash seed)
  GPT laid out by sfdisk with GUIDs derived from the appliance name.

Everything runs in the trixie tools tree (ukify, e2fsprogs >= 1.47, erofs-utils, mtools); every timestamp is
SOURCE_DATE_EPOCH, so the same tree gives the same bytes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .disk import DATA_TYPE, ESP_TYPE, VAR_IN_ROOT, DiskIds, Layout, MiB, Slot
from .platform import Platform
from .run import BuildLog
from .tools import EfiBinaries, ToolsTree


def build_uki(tools: ToolsTree, kernel: Path, initrd: Path, os_release: Path, cmdline: str, out: Path,
              sde: int, log: BuildLog, efi: EfiBinaries) -> None:
    version = kernel.name.removeprefix("vmlinuz-")
    tools.run(["ukify", "build", f"--linux={kernel}", f"--initrd={initrd}", f"--cmdline={cmdline}",
               f"--os-release=@{os_release}", f"--uname={version}",
               f"--stub={efi.stub}", f"--output={out}"],
              binds=[kernel.parent, os_release.parent, out.parent, *efi.binds], log=log, what="ukify",
              env={"SOURCE_DATE_EPOCH": str(sde)})
    os.utime(out, (sde, sde))


# no menu (timeout 0: a key held at boot still shows it), no editing of the kernel command line
# (it would let anyone at the console boot into a shell), nothing but the appliance's own entries
LOADER_CONF = "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n"


def mkfs_fat(out: Path, label: str, ids: DiskIds, size: int) -> str:
    """The shell command that makes a boot partition's FAT32 file system: the same bytes each build
    (--invariant, the volume id from the appliance's name)."""
    return f"mkfs.vfat -F 32 -n {label} -i {ids.esp_serial} --invariant -C {out} {size // 1024} >/dev/null"


def build_esp(tools: ToolsTree, uki: Path, out: Path, ids: DiskIds, size: int, sde: int, log: BuildLog,
              entry: str, plat: Platform, efi: EfiBinaries) -> None:
    """The ESP: systemd-boot (from the tools tree) as the firmware's fallback loader, its
    loader.conf, and the UKI as entry."""
    conf = out.with_name("loader.conf")
    conf.write_text(LOADER_CONF)
    os.utime(conf, (sde, sde))  # mcopy -m keeps it
    script = (
        f"{mkfs_fat(out, 'ESP', ids, size)} && "
        f"mmd -i {out} ::/EFI ::/EFI/BOOT ::/EFI/Linux ::/loader && "
        f"mcopy -m -i {out} {efi.loader} ::{plat.fallback_loader} && "
        f"mcopy -m -i {out} {conf} ::/loader/loader.conf && "
        f"mcopy -m -i {out} {uki} ::/{entry}")
    # mtools stamps the directories it makes with SOURCE_DATE_EPOCH instead of the time of the build
    try:
        tools.run(["sh", "-c", script], binds=[out.parent, uki.parent, *efi.binds], log=log,
                  what="ESP (mkfs.vfat, mtools)",
                  env={"MTOOLS_SKIP_CHECK": "1", "SOURCE_DATE_EPOCH": str(sde)})
    finally:
        conf.unlink(missing_ok=True)


def build_root_fs(tools: ToolsTree, tree: Path, out: Path, ids: DiskIds, sde: int, log: BuildLog) -> None:
    """The read-only root: erofs, lz4hc-compressed (the kernel decompresses lz4 fastest, which is
    what a slow CPU reads its root with). Owners, modes, xattrs and mtimes are the tree's; the
    superblock's time is SOURCE_DATE_EPOCH."""
    var = sorted(os.listdir(tree / "var"))
    leave_out = [f"--exclude-path=var/{name}" for name in var if name not in VAR_IN_ROOT]
    leave_out += [f"--exclude-regex=^var/{name}/." for name in VAR_IN_ROOT if name in var]
    tools.run(["mkfs.erofs", "--quiet", "-zlz4hc,12", "-L", "root", "-U", ids.root_fs, f"-T{sde}", *leave_out,
               out, tree],
              binds=[tree, out.parent], log=log, what="mkfs.erofs",
              env={"SOURCE_DATE_EPOCH": str(sde)})


def build_data_fs(tools: ToolsTree, var: Path, out: Path, ids: DiskIds, size: int, sde: int, log: BuildLog) -> None:
    """The data partition as a fresh image has it: the tree's /var."""
    tools.run(["mkfs.ext4", "-q", "-L", "data", "-U", ids.data_fs,
               "-E", f"hash_seed={ids.data_fs},root_owner=0:0", "-d", var, out, f"{size // 1024}K"],
              binds=[var, out.parent], log=log, what="mkfs.ext4 -d (data)",
              env={"E2FSPROGS_FAKE_TIME": str(sde), "SOURCE_DATE_EPOCH": str(sde)})


def write_disk(tools: ToolsTree, out: Path, esp: Path, root: Path, data: Path, lay: Layout, ids: DiskIds,
               log: BuildLog, root_type: str, boot_type: str = ESP_TYPE) -> None:
    """Partition table on a sparse file, then the file systems copied in at their offsets (slot B
    stays a hole). The file is 0600 from its first byte: it will hold the appliance's private key."""
    with open(private_file(out), "wb") as f:
        f.truncate(lay.disk_size)

    def part(offset: int, size: int, type_: str, uuid: str, name: str) -> str:
        return f"start={offset // 512}, size={size // 512}, type={type_}, uuid={uuid}, name={name}\n"

    table = (
        "label: gpt\n"
        f"label-id: {ids.disk}\n"
        "first-lba: 2048\n"
        + part(lay.esp_offset, lay.esp_size, boot_type, ids.esp, "esp")
        + "".join(part(lay.slot_offset(s), lay.slot_size, root_type, ids.slot_partition(s), f"root-{s}")
                  for s in Slot)
        + part(lay.data_offset, lay.data_size, DATA_TYPE, ids.data_part, "data"))
    tools.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", out], binds=[out.parent], log=log, what="sfdisk",
              input=table)
    copy_sparse(esp, out, lay.esp_offset)
    copy_sparse(root, out, lay.slot_offset(Slot.A))
    copy_sparse(data, out, lay.data_offset)


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
