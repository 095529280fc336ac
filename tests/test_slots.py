"""The device's side of an update (appliance.dataplane.slots) on files standing in for the ESP and the
root slots, and the host's payload helpers (appliance.update): fast, no root, no VM. The whole path
(a real disk, SSH, reboots, boot counting) is tests/test_update.py."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from appliance.dataplane import slots
from appliance.errors import InputError
from appliance.image.disk import DiskIds, Slot, kernel_cmdline
from appliance.update import Target, erofs_size, retarget_uki


def esp_with(tmp_path: Path, *files: str) -> Path:
    esp = tmp_path / "esp"
    (esp / slots.ENTRIES).mkdir(parents=True)
    for f in files:
        (esp / slots.ENTRIES / f).write_bytes(b"uki")
    return esp


def test_entry_names() -> None:
    assert slots.parse_entry("exit-node-1-a+3.efi") == slots.Entry("exit-node-1-a+3.efi", "exit-node", 1, "a", 3, 0)
    assert slots.parse_entry("exit-node-2-b+1-2.efi").state == "trying"  # type: ignore[union-attr]
    assert slots.parse_entry("exit-node-2-b+0-3.efi").state == "bad"  # type: ignore[union-attr]
    assert slots.parse_entry("exit-node-2-b.efi").state == "good"  # type: ignore[union-attr]
    for junk in ("exit-node-2-c.efi", "exit-node.efi", "exit-node-x-a.efi", "../x-1-a.efi", "exit-node-1-a+3.efi.tmp"):
        assert slots.parse_entry(junk) is None, junk
    assert slots.entry_name("r1", 4, "b") == "r1-4-b+3.efi" and slots.entry_name("r1", 4, "b", None) == "r1-4-b.efi"


def test_entries_in_boot_order(tmp_path: Path) -> None:
    """systemd-boot's choice: the highest generation with tries left; a bad entry last whatever its generation."""
    esp = esp_with(tmp_path, "n-1-a.efi", "n-3-a+0-3.efi", "n-2-b+2-1.efi", "README.txt")
    assert [e.file for e in slots.entries(esp)] == ["n-2-b+2-1.efi", "n-1-a.efi", "n-3-a+0-3.efi"]


def test_booted_slot(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("22 1 254:2 / / ro,relatime shared:1 - erofs /dev/vda2 ro,user_xattr\n"
                         "30 22 254:4 / /var rw,noatime shared:2 - ext4 /dev/vda4 rw\n")
    (tmp_path / "vda2").mkdir()
    (tmp_path / "vda2/uevent").write_text("MAJOR=254\nMINOR=2\nDEVNAME=vda2\nPARTN=2\nPARTNAME=root-a\n")
    assert slots.booted_slot(mountinfo, tmp_path) == "a"
    (tmp_path / "vda2/uevent").write_text("PARTNAME=data\n")  # control: / on something else
    with pytest.raises(slots.SlotError):
        slots.booted_slot(mountinfo, tmp_path)


def install(tmp_path: Path, esp: Path, stream: bytes, **kw: Any) -> dict[str, Any]:
    devices = tmp_path / "dev"
    devices.mkdir(exist_ok=True)
    for s in ("a", "b"):
        if not (devices / f"root-{s}").exists():
            (devices / f"root-{s}").write_bytes(b"\0" * 4096)
    return slots.install(io.BytesIO(stream), name="n", esp=esp, devices=devices, booted="a", say=lambda m: None, **kw)


def digests(root: bytes, uki: bytes) -> dict[str, Any]:
    return {"root_size": len(root), "root_sha256": hashlib.sha256(root).hexdigest(),
            "uki_size": len(uki), "uki_sha256": hashlib.sha256(uki).hexdigest()}


def test_install_into_the_other_slot(tmp_path: Path) -> None:
    esp = esp_with(tmp_path, "n-1-a.efi", "n-2-b+0-3.efi")  # slot B held a root that failed
    root, uki = b"R" * 3000, b"U" * 100
    result = install(tmp_path, esp, root + uki, **digests(root, uki))
    assert result == {"slot": "b", "generation": 3, "entry": "n-3-b+3.efi"}
    assert (tmp_path / "dev/root-b").read_bytes()[:3000] == root
    assert (tmp_path / "dev/root-a").read_bytes() == b"\0" * 4096  # the running slot is not touched
    assert sorted(p.name for p in (esp / slots.ENTRIES).iterdir()) == ["n-1-a.efi", "n-3-b+3.efi"]
    assert (esp / slots.ENTRIES / "n-3-b+3.efi").read_bytes() == uki


@pytest.mark.parametrize("damage", ["root", "uki", "short"])
def test_damaged_install_leaves_nothing_bootable(tmp_path: Path, damage: str) -> None:
    """A payload that does not match its digests (or ends early) leaves no entry for the slot: the
    old one was removed before the slot was written, the new one is never made."""
    esp = esp_with(tmp_path, "n-1-a.efi", "n-2-b.efi")
    root, uki = b"R" * 3000, b"U" * 100
    sent = {"root": b"X" + root[1:] + uki, "uki": root + b"X" + uki[1:], "short": root + uki[:50]}[damage]
    with pytest.raises(slots.SlotError):
        install(tmp_path, esp, sent, **digests(root, uki))
    assert sorted(p.name for p in (esp / slots.ENTRIES).iterdir()) == ["n-1-a.efi"]


def test_install_refuses_a_name_that_is_no_entry_name(tmp_path: Path) -> None:
    esp = esp_with(tmp_path, "n-1-a.efi")
    with pytest.raises(slots.SlotError):
        slots.install(io.BytesIO(b""), name="../../x", esp=esp, devices=tmp_path, booted="a", say=lambda m: None,
                      root_size=0, root_sha256="", uki_size=0, uki_sha256="")


class Calls(list[list[str]]):
    def __call__(self, cmd: list[str], check: bool = False) -> None:
        self.append(cmd)


def test_fail_boot_goes_back_only_when_it_can(tmp_path: Path) -> None:
    run = Calls()
    esp = esp_with(tmp_path, "n-1-a.efi", "n-2-b+1-2.efi")
    assert "rebooting into n-1-a.efi" in slots.fail_boot(esp, run, booted="b")
    assert run == [["/usr/lib/systemd/systemd-bless-boot", "bad"], ["systemctl", "--no-block", "reboot"]]
    for files, booted in ((("n-1-a+2-1.efi",), "a"),  # a fresh device's first root: nothing to go back to
                          (("n-1-a.efi", "n-2-b.efi"), "b")):  # a blessed root is not on trial
        run.clear()
        slots.fail_boot(esp_with(tmp_path / booted / str(len(files)), *files), run, booted=booted)
        assert run == [], files


def test_fail_boot_on_a_board_without_boot_counting(tmp_path: Path) -> None:
    """A Pi's boot partition has no EFI/Linux: an unhealthy boot stays, and says why."""
    (tmp_path / "pi").mkdir()
    run = Calls()
    assert "counts no tries" in slots.fail_boot(tmp_path / "pi", run, booted="a")
    assert run == []


def test_rollback(tmp_path: Path) -> None:
    run = Calls()
    esp = esp_with(tmp_path, "n-1-a.efi", "n-2-b.efi")
    slots.rollback(esp, run, booted="b")
    assert [e.file for e in slots.entries(esp)] == ["n-1-a.efi", "n-2-b+0-0.efi"] and run
    with pytest.raises(slots.SlotError):  # control: nothing blessed on the other slot
        slots.rollback(esp_with(tmp_path / "x", "n-1-a+0-3.efi", "n-2-b.efi"), Calls(), booted="b")


def test_target_spec() -> None:
    assert Target.parse("10.0.0.1").host == "root@10.0.0.1"
    t = Target.parse("admin@edge-1:2222")
    assert (t.host, t.port) == ("admin@edge-1", 2222)
    assert t.ssh("true")[-3:] == ["--", "admin@edge-1", "true"]
    for bad in ("-oProxyCommand=x", "h:0", "h:99999", "h:ssh", "a b", "@", "-u@h"):
        with pytest.raises(InputError):
            Target.parse(bad)


def test_erofs_size(tmp_path: Path) -> None:
    img = tmp_path / "disk"
    sb = bytearray(1024 + 128)
    struct.pack_into("<I", sb, 1024, 0xE0F5E1E2)
    struct.pack_into("<B", sb, 1024 + 12, 12)
    struct.pack_into("<I", sb, 1024 + 36, 24263)
    img.write_bytes(b"\0" * 4096 + bytes(sb))
    assert erofs_size(img, 4096) == 24263 * 4096
    with pytest.raises(Exception, match="no erofs root"):
        erofs_size(img, 0)


def test_retarget_uki() -> None:
    ids = DiskIds.for_name("n")
    for vm in (True, False):
        a, b = kernel_cmdline(ids, Slot.A, vm=vm), kernel_cmdline(ids, Slot.B, vm=vm)
        uki = b"MZ..." + a.encode() + b"\0...osrel"
        assert retarget_uki(uki, "n", vm, Slot.B) == b"MZ..." + b.encode() + b"\0...osrel"
        with pytest.raises(Exception, match="command line"):
            retarget_uki(b"MZ...", "n", vm, Slot.B)


def test_entry_names_agree_with_the_build() -> None:
    """The build names the first entry, the device every later one: one grammar."""
    from appliance.image.disk import uki_entry

    for generation, slot in ((1, Slot.A), (12, Slot.B)):
        for tries in (3, None):
            assert Path(uki_entry("n", generation, slot, tries)).name == slots.entry_name("n", generation, str(slot),
                                                                                           tries)


def test_install_sends_only_new_blocks(tmp_path: Path) -> None:
    """Blocks the running root or UKI has anywhere (a new root shifts unchanged files' blocks) are
    copied on the device, not sent; the result is the new root and UKI all the same (their sha256 is
    checked), and a plan that copies the wrong block is caught by that."""
    from appliance.update import Payload

    block = 512
    old = b"".join(bytes([i]) * block for i in range(8))  # eight distinct blocks
    new = old[:block] + b"N" * block + old[block:6 * block] + b"tail"  # a block inserted: the rest shifts
    old_uki, new_uki = b"K" * 1000 + b"root=/dev/vda2", b"K" * 1000 + b"root=/dev/vda3"
    esp = esp_with(tmp_path)
    (esp / slots.ENTRIES / "n-1-a.efi").write_bytes(old_uki)
    devices = tmp_path / "dev"
    devices.mkdir()
    (devices / "root-a").write_bytes(old + b"\0" * 4096)
    (devices / "root-b").write_bytes(b"\0" * 8192)
    image = tmp_path / "image"
    image.write_bytes(b"\0" * 100 + new)
    has = {"block": block, "root": {"hashes": slots.block_hashes(devices / "root-a", len(old), block)},
           "uki": {"hashes": slots.block_hashes(esp / slots.ENTRIES / "n-1-a.efi", len(old_uki), block)}}
    p = Payload(image, 100, len(new), hashlib.sha256(new).hexdigest(), new_uki, block=block).with_plan(has)
    assert p.plan == {"root": [[1, 0], [1, -1], [5, 1], [1, -1]], "uki": [[1, 0], [1, -1]]}
    assert p.bytes_to_send == block + 4 + (len(new_uki) - block)
    head, _, body = b"".join(p.stream()).partition(b"\n")
    assert len(body) == p.bytes_to_send

    def install_with(plan: dict[str, Any]) -> dict[str, Any]:
        return slots.install(io.BytesIO(body), name="n", esp=esp, devices=devices, booted="a", plan=plan,
                             say=lambda m: None, root_size=len(new), root_sha256=p.root_sha256,
                             uki_size=len(new_uki), uki_sha256=p.uki_sha256)

    result = install_with(json.loads(head))
    assert result["slot"] == "b" and (devices / "root-b").read_bytes()[:len(new)] == new
    assert (esp / slots.ENTRIES / result["entry"]).read_bytes() == new_uki
    wrong = json.loads(head)
    wrong["root"][2] = [5, 2]  # control: copies the wrong blocks
    with pytest.raises(slots.SlotError, match="damaged"):
        install_with(wrong)
