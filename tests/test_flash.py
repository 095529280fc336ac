"""`appliance flash` on loop devices made by the test: a flash that verifies, the refusals (nothing
written), and a corrupted medium caught by verification."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, require_tool

pytestmark = pytest.mark.root
MiB = 1024 * 1024


def appliance(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, cwd=REPO,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """A 24 MiB sparse image with a few data regions, and its .bmap."""
    img = tmp_path / "edge.img"
    with open(img, "wb") as f:
        f.truncate(24 * MiB)
        for offset in (0, 5 * MiB, 17 * MiB):
            f.seek(offset)
            f.write(os.urandom(300 * 1024))
    require_tool("bmaptool")
    subprocess.run(["bmaptool", "create", "-o", str(img) + ".bmap", str(img)], check=True, capture_output=True)
    return img


class Loops:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.devices: list[str] = []
        self.mounts: list[str] = []

    def make(self, size: int) -> str:
        backing = self.tmp / f"disk{len(self.devices)}.raw"
        with open(backing, "wb") as f:
            f.truncate(size)
        for attempt in range(5):  # another process may take the free device between lookup and attach
            proc = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
            if proc.returncode == 0:
                dev = proc.stdout.strip()
                self.devices.append(dev)
                return dev
            time.sleep(0.2 * (attempt + 1))
        raise AssertionError(f"no loop device: {proc.stderr}")

    def close(self) -> None:
        for m in reversed(self.mounts):
            subprocess.run(["umount", m], capture_output=True)
        for dev in self.devices:
            subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[Loops]:
    lo = Loops(tmp_path)
    try:
        yield lo
    finally:
        lo.close()


def digest(dev: str, size: int) -> str:
    with open(dev, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def test_flash_and_verify(image: Path, loops: Loops) -> None:
    dev = loops.make(32 * MiB)
    result = appliance("flash", str(image), dev, "--yes", "--force", "--allow-loop")
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    assert digest(dev, 24 * MiB) == hashlib.sha256(image.read_bytes()).hexdigest()


def test_full_write_without_bmap_warns_and_verifies(image: Path, loops: Loops) -> None:
    Path(str(image) + ".bmap").unlink()
    dev = loops.make(32 * MiB)
    result = appliance("flash", str(image), dev, "--yes", "--force", "--allow-loop")
    assert result.returncode == 0, result.stderr
    assert "no .bmap" in result.stderr and "verified" in result.stdout


def test_refuses_a_mounted_device(image: Path, loops: Loops, tmp_path: Path) -> None:
    dev = loops.make(32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    (tmp_path / "mnt").mkdir()
    # read-only: a read-write ext4 mount writes to the device by itself (journal commits, lazy inode
    # table init), which would look like the flash wrote to it
    subprocess.run(["mount", "-o", "ro", dev, str(tmp_path / "mnt")], check=True)
    loops.mounts.append(str(tmp_path / "mnt"))
    before = digest(dev, 24 * MiB)
    result = appliance("flash", str(image), dev, "--yes", "--force", "--allow-loop")
    assert result.returncode == 1 and "mounted" in result.stderr
    assert digest(dev, 24 * MiB) == before


def test_refuses_a_device_smaller_than_the_image(image: Path, loops: Loops) -> None:
    dev = loops.make(16 * MiB)
    result = appliance("flash", str(image), dev, "--yes", "--force", "--allow-loop")
    assert result.returncode == 1 and "smaller" in result.stderr
    assert digest(dev, 16 * MiB) == hashlib.sha256(bytes(16 * MiB)).hexdigest()


def test_refuses_a_non_removable_device_without_force(image: Path, loops: Loops) -> None:
    dev = loops.make(32 * MiB)  # loop devices report neither removable nor USB
    result = appliance("flash", str(image), dev, "--yes", "--allow-loop")
    assert result.returncode == 1 and "--force" in result.stderr
    assert digest(dev, 24 * MiB) == hashlib.sha256(bytes(24 * MiB)).hexdigest()


def test_refuses_a_regular_file(image: Path, tmp_path: Path) -> None:
    target = tmp_path / "not-a-disk"
    target.write_bytes(b"")
    result = appliance("flash", str(image), str(target), "--yes", "--force", "--allow-loop")
    assert result.returncode == 1 and "not a block device" in result.stderr and target.read_bytes() == b""


def test_asks_before_writing(image: Path, loops: Loops) -> None:
    dev = loops.make(32 * MiB)
    result = appliance("flash", str(image), dev, "--force", "--allow-loop")  # no --yes, and no one to answer
    assert result.returncode == 1 and "nothing written" in result.stderr


def test_corrupted_medium_is_detected(image: Path, loops: Loops) -> None:
    dev = loops.make(32 * MiB)
    assert appliance("flash", str(image), dev, "--yes", "--force", "--allow-loop").returncode == 0
    with open(dev, "r+b") as f:  # one flipped byte inside a mapped range, as a failing card would
        f.seek(5 * MiB + 1234)
        byte = f.read(1)
        f.seek(5 * MiB + 1234)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    result = appliance("flash", str(image), dev, "--verify-only")
    assert result.returncode == 1 and "verification failed" in result.stderr


def test_refuses_a_loop_device_without_allow_loop(image: Path, loops: Loops) -> None:
    dev = loops.make(32 * MiB)
    result = appliance("flash", str(image), dev, "--yes", "--force")
    assert result.returncode == 1 and "--allow-loop" in result.stderr
    assert digest(dev, 24 * MiB) == hashlib.sha256(bytes(24 * MiB)).hexdigest()


def test_refuses_a_partition_even_with_force(image: Path, loops: Loops) -> None:
    """A partition (here of a loop device with a partition table) is never a target: --force does
    not make it one."""
    dev = loops.make(64 * MiB)
    subprocess.run([require_tool("sfdisk"), "-q", dev], input="label: gpt\nstart=2048, size=100000\n", text=True,
                   check=True)
    subprocess.run([require_tool("partx"), "-a", dev], capture_output=True)
    part = f"{dev}p1"
    for _ in range(50):
        if os.path.exists(part):
            break
        time.sleep(0.1)
    before = digest(part, 24 * MiB)
    result = appliance("flash", str(image), part, "--yes", "--force", "--allow-loop")
    assert result.returncode == 1 and "not a whole disk but a part" in result.stderr, result.stderr
    assert digest(part, 24 * MiB) == before


def test_refuses_a_device_the_kernel_holds(image: Path, loops: Loops) -> None:
    """An unmounted RAID/LVM/LUKS member is held by the kernel: an exclusive open fails. Here another
    process holds the device exclusively, as a device-mapper table would."""
    dev = loops.make(32 * MiB)
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; "
                               f"os.open({dev!r}, os.O_RDONLY | os.O_EXCL); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = appliance("flash", str(image), dev, "--yes", "--force", "--allow-loop")
        assert result.returncode == 1 and "in use" in result.stderr, result.stderr
    finally:
        holder.kill()
        holder.wait()
    assert digest(dev, 24 * MiB) == hashlib.sha256(bytes(24 * MiB)).hexdigest()
    # control: released, the same device is written
    assert appliance("flash", str(image), dev, "--yes", "--force", "--allow-loop").returncode == 0


def test_verify_without_checksums_in_the_bmap_still_compares(image: Path, loops: Loops) -> None:
    """A .bmap without checksums (bmaptool create --no-checksum) must not make verification pass by
    checking nothing: the ranges are compared with the image itself."""
    dev = loops.make(32 * MiB)
    bmap = Path(str(image) + ".bmap")
    subprocess.run(["bmaptool", "create", "--no-checksum", "-o", str(bmap), str(image)], check=True,
                   capture_output=True)
    assert "chksum=" not in bmap.read_text()
    assert appliance("flash", str(image), dev, "--yes", "--force", "--allow-loop").returncode == 0
    with open(dev, "r+b") as f:
        f.seek(17 * MiB + 99)
        f.write(b"\x00\xff")
        f.flush()
        os.fsync(f.fileno())
    result = appliance("flash", str(image), dev, "--verify-only")
    assert result.returncode == 1 and "verification failed" in result.stderr
