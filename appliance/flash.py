"""`appliance flash`: write an image to an SD card, USB stick or disk, safely, and prove it arrived.

Refused (nothing written): not a block device; not a whole disk (a partition, an LVM, dm-crypt or
RAID device; a loop device only with --allow-loop); any partition mounted; in use by the kernel (an
exclusive open fails: an unmounted RAID, LVM or LUKS member, swap); the running system's root or
swap; smaller than the image; not removable and not USB unless forced. The device is opened
exclusively while it is written (as bmaptool does), so nothing mounts it meanwhile. The write uses
bmaptool and the image's .bmap (only mapped blocks), or a full copy when there is no bmap; then the device is synced,
its page cache dropped, and every written range read back and compared with the image (ranges the
.bmap gives no checksum for are compared with the image's own bytes)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from xml.etree import ElementTree

from .runner import CommandFailed, run, spawn

CHUNK = 4 * 1024 * 1024


class FlashError(CommandFailed):
    pass


@dataclass(frozen=True)
class Target:
    path: str
    size: int
    removable: bool
    transport: str
    model: str
    serial: str
    mounted: tuple[str, ...]  # mount points of the device and its partitions
    devices: tuple[str, ...]  # the device and its partitions
    kind: str = "disk"  # lsblk's TYPE: disk, loop, part, lvm, crypt, raid1, dm, rom, ...

    def describe(self) -> str:
        size = f"{self.size / 1e9:.1f} GB" if self.size >= 1e9 else f"{self.size / 2**20:.0f} MiB"
        return (f"{self.path}: {self.model or 'unknown model'}, {size}, "
                f"{self.transport or 'no transport'}{', removable' if self.removable else ''}"
                f"{', serial ' + self.serial if self.serial else ''}")


def inspect_target(device: Path) -> Target:
    try:
        mode = os.stat(device).st_mode
    except OSError as e:
        raise FlashError(f"{device}: {e.strerror}") from None
    if not stat.S_ISBLK(mode):
        raise FlashError(f"{device} is not a block device (give the whole disk, e.g. /dev/sdb)")
    out = run(["lsblk", "-J", "-b", "-o", "NAME,PATH,SIZE,RM,TRAN,MODEL,SERIAL,TYPE,MOUNTPOINTS", "--", device],
              check=False, error=FlashError)
    if out.returncode != 0:
        raise FlashError(f"lsblk {device}: {out.stderr.strip()}")
    disk = json.loads(out.stdout)["blockdevices"][0]
    nodes = list(_walk(disk))
    return Target(
        path=disk["path"], size=int(disk["size"]), removable=bool(disk.get("rm")),
        transport=disk.get("tran") or "", model=(disk.get("model") or "").strip(),
        serial=(disk.get("serial") or "").strip(),
        mounted=tuple(m for n in nodes for m in (n.get("mountpoints") or []) if m),
        devices=tuple(n["path"] for n in nodes), kind=str(disk.get("type") or ""))


def _walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("children") or []:
        yield from _walk(child)


def _system_devices() -> set[str]:
    """Devices behind / and active swap, as real paths."""
    found = set()
    root = run(["findmnt", "-n", "-o", "SOURCE", "/"], check=False, error=FlashError).stdout.strip()
    if root.startswith("/dev/"):
        found.add(os.path.realpath(root))
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        if line.startswith("/dev/"):
            found.add(os.path.realpath(line.split()[0]))
    return found


def refusals(target: Target, image_size: int, force: bool, allow_loop: bool = False) -> list[str]:
    reasons = []
    if target.kind == "loop" and not allow_loop:
        reasons.append("it is a loop device (an image file attached with losetup): add --allow-loop if you mean it")
    elif target.kind not in ("disk", "loop"):
        reasons.append(f"it is not a whole disk but a {target.kind or 'device of unknown type'} (a partition, or a "
                       "device-mapper, LVM or RAID device): give the disk itself, e.g. /dev/sdb")
    if in_use(target.path):
        reasons.append("it is in use by the kernel (mounted, swap, or a member of a RAID, LVM or encrypted volume)")
    if target.mounted:
        reasons.append(f"it is mounted ({', '.join(target.mounted)}): unmount every partition first")
    system = _system_devices() & {os.path.realpath(d) for d in target.devices}
    if system:
        reasons.append(f"it holds this system's root or swap ({', '.join(sorted(system))})")
    if target.size < image_size:
        reasons.append(f"it is smaller ({target.size} bytes) than the image ({image_size} bytes)")
    if not force and not target.removable and target.transport != "usb":
        reasons.append("it is neither removable nor USB (a built-in disk?): add --force if you mean it")
    return reasons


@dataclass
class BlockMap:
    """The mapped ranges of an image and their sha256, from bmaptool's .bmap (format 2.x)."""

    image_size: int
    block_size: int
    ranges: list[tuple[int, int, str]] = field(default_factory=list)  # first block, last block, sha256

    @classmethod
    def read(cls, path: Path) -> BlockMap:
        root = ElementTree.parse(path).getroot()
        bm = cls(int(root.findtext("ImageSize") or 0), int(root.findtext("BlockSize") or 4096))
        for r in root.iter("Range"):
            first, _, last = (r.text or "").strip().partition("-")
            bm.ranges.append((int(first), int(last or first), r.get("chksum", "")))
        return bm


def in_use(device: str) -> bool:
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as e:
        return e.errno == errno.EBUSY
    return False


def write(image: Path, device: str, bmap: Path | None, log: Callable[[str], None]) -> None:
    if bmap is not None:
        proc = spawn(["bmaptool", "copy", "--bmap", bmap, image, device], output=subprocess.PIPE)
        tail: list[str] = []
        for raw in proc.stdout or ():  # bmaptool reports "NN% copied" as it goes
            line = raw.decode(errors="replace").strip()
            tail = (tail + [line])[-5:]
            if "%" in line:
                log(line.split("info: ", 1)[-1])
        if proc.wait() != 0:
            raise FlashError(f"bmaptool copy failed: {' / '.join(tail)}")
    else:
        log("no .bmap beside the image: writing every block (slower)")
        size = image.stat().st_size
        # O_EXCL, as bmaptool opens it: nothing mounts or claims the device while it is written
        try:
            fd = os.open(device, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as e:
            raise FlashError(f"cannot open {device} exclusively: {e.strerror}") from None
        with open(image, "rb") as src, os.fdopen(fd, "wb") as dst:
            done = 0
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                done += len(chunk)
                if done % (256 * CHUNK) == 0:
                    log(f"{done * 100 // size} %")
            dst.flush()
            os.fsync(dst.fileno())
    _sync_and_forget(device)


def _sync_and_forget(device: str) -> None:
    """Flush the device and drop its cached pages, so reading back reads the medium."""
    fd = os.open(device, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def verify(image: Path, device: str, bmap: Path | None) -> int:
    """Compare what the device holds with the image; returns the bytes compared. Raises on mismatch.
    A range the .bmap has no checksum for is compared with the image's bytes: verifying never passes
    by checking nothing."""
    _sync_and_forget(device)
    with open(device, "rb") as dev, open(image, "rb") as img:
        if bmap is not None:
            bm = BlockMap.read(bmap)
            compared = 0
            for first, last, digest in bm.ranges:
                start = first * bm.block_size
                length = min((last - first + 1) * bm.block_size, bm.image_size - start)
                if digest:
                    got = _sha256_range(dev, start, length)
                    if got != digest:
                        raise FlashError(f"verification failed: blocks {first}-{last} on {device} differ from the "
                                         "image")
                elif _sha256_range(dev, start, length) != _sha256_range(img, start, length):
                    raise FlashError(f"verification failed: blocks {first}-{last} on {device} differ from the image")
                compared += length
            return compared
        size = image.stat().st_size
        done = 0
        while done < size:
            a, b = img.read(CHUNK), dev.read(CHUNK)
            if a != b[:len(a)]:
                raise FlashError(f"verification failed near byte {done} of {device}")
            done += len(a)
        return size


def _sha256_range(f: BinaryIO, start: int, length: int) -> str:
    h = hashlib.sha256()
    f.seek(start)
    remaining = length
    while remaining > 0:
        data = f.read(min(CHUNK, remaining))
        if not data:
            break
        h.update(data)
        remaining -= len(data)
    return h.hexdigest()
