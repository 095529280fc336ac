"""appliance-dataplane slot: the device's side of an update.

The disk has two root slots (partitions labelled root-a and root-b) and an ESP with one UKI per
installed root, EFI/Linux/NAME-GENERATION-SLOT[+LEFT[-DONE]].efi: systemd-boot boots the entry whose
name sorts highest among those with tries left, counts the try down in its name, and
systemd-bless-boot removes the counter once appliance-health has passed.

  status    the booted slot, the entries, this boot's health verdict and the last unhealthy one
  sources   the running root's and UKI's block hashes, so that an update sends only new blocks
  install   a new root (read from stdin) into the slot that is not running, then its UKI with
            boot counting: the next boot tries it; its entries for that slot are removed first, so
            an interrupted install leaves nothing that boots a half-written root
  fail-boot (appliance-health's OnFailure=) mark this boot's entry bad and reboot into the previous
            root, when there is one that was blessed; never on a device with nothing to go back to
  rollback  mark this root's entries bad and reboot into the other slot's blessed root

Standard library only (the image's python3)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .health import LAST_UNHEALTHY, STATE_FILE

ESP = Path("/efi")
RELEASE_JSON = "usr/lib/appliance/release.json"  # in the root: what the image was made of (the build writes it)
ENTRIES = "EFI/Linux"
STATE_DIR = Path("/var/lib/appliance")
SLOTS = ("a", "b")
BOOT_TRIES = 3
CHUNK = 1024 * 1024  # reads and writes
BLOCK = 4096  # an update's unit of reuse: erofs's block
_NAME = re.compile(r"[a-z0-9][a-z0-9-]*")
_ENTRY = re.compile(r"(?P<name>[a-z0-9][a-z0-9-]*)-(?P<generation>[0-9]+)-(?P<slot>[ab])"
                    r"(?:\+(?P<left>[0-9]+)(?:-(?P<done>[0-9]+))?)?\.efi")


class SlotError(Exception):
    pass


@dataclass(frozen=True)
class Entry:
    file: str
    name: str
    generation: int
    slot: str
    tries_left: int | None  # None: blessed (no counter)
    tries_done: int

    @property
    def state(self) -> str:
        if self.tries_left is None:
            return "good"
        return "bad" if self.tries_left == 0 else "trying"

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "generation": self.generation, "slot": self.slot, "state": self.state,
                "tries_left": self.tries_left, "tries_done": self.tries_done}


def parse_entry(file: str) -> Entry | None:
    m = _ENTRY.fullmatch(file)
    if not m:
        return None
    left = m["left"]
    return Entry(file, m["name"], int(m["generation"]), m["slot"], None if left is None else int(left),
                 int(m["done"] or 0))


def mount_esp(esp: Path = ESP) -> None:
    """The ESP on /efi: efi.mount (the image's), which systemd-bless-boot has mounted unless this
    boot was not blessed."""
    if esp == ESP and not os.path.ismount(esp):
        subprocess.run(["systemctl", "start", "efi.mount"], check=True, capture_output=True)


def entries(esp: Path = ESP) -> list[Entry]:
    """The appliance's entries, in systemd-boot's order: tries left first, then the highest generation."""
    mount_esp(esp)
    found = [e for f in sorted(os.listdir(esp / ENTRIES)) if (e := parse_entry(f))]
    return sorted(found, key=lambda e: (e.state == "bad", -e.generation))


def entry_name(name: str, generation: int, slot: str, tries: int | None = BOOT_TRIES) -> str:
    return f"{name}-{generation}-{slot}" + ("" if tries is None else f"+{tries}") + ".efi"


def booted_slot(mountinfo: Path = Path("/proc/self/mountinfo"), sys_block: Path = Path("/sys/class/block")) -> str:
    """The slot / was mounted from, by its partition's GPT name (root-a, root-b)."""
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            source = fields[fields.index("-") + 2]
            uevent = (sys_block / Path(source).name / "uevent").read_text()
            names = [v for k, _, v in (ln.partition("=") for ln in uevent.splitlines()) if k == "PARTNAME"]
            if names and names[0].startswith("root-") and names[0][5:] in SLOTS:
                return names[0][5:]
            raise SlotError(f"/ is on {source}, not on a root slot")
    raise SlotError("no / in the mount table")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def status(esp: Path = ESP, state_dir: Path = STATE_DIR) -> dict[str, Any]:
    booted = booted_slot()
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    release = _read_json(Path("/") / RELEASE_JSON) or {}
    return {"booted_slot": booted, "boot_id": boot_id, "release": release,
            "entries": [e.to_json() for e in entries(esp)],
            "health": _read_json(state_dir / STATE_FILE),
            "last_unhealthy": _read_json(state_dir / LAST_UNHEALTHY)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def erofs_bytes(device: Path, offset: int = 0) -> int:
    """The length of the erofs file system at offset of device (its superblock: block size's log2 at
    12, block count at 36, 1024 bytes in); 0 when there is none (an empty slot)."""
    with open(device, "rb") as f:
        f.seek(offset + 1024)
        sb = f.read(40)
    if len(sb) < 40 or int.from_bytes(sb[:4], "little") != 0xE0F5E1E2:
        return 0
    return int.from_bytes(sb[36:40], "little") << sb[12]


def block_digest(data: bytes) -> str:
    """A block's identity for reuse (64 bits: the whole root's and UKI's sha256 are checked after all)."""
    return hashlib.sha256(data).hexdigest()[:16]


def block_hashes(path: Path, size: int, block: int = BLOCK, offset: int = 0) -> list[str]:
    """The block_digest of each block of size bytes of path from offset."""
    out = []
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, size, block):
            out.append(block_digest(f.read(min(block, size - start))))
    return out


def sources(esp: Path = ESP, devices: Path = Path("/dev/disk/by-partlabel"), booted: str | None = None,
            block: int = BLOCK) -> dict[str, Any]:
    """What this device already has, block by block: the running root and its UKI. An update sends
    only the blocks of the new ones found in neither (erofs keeps a file's blocks whole and aligned,
    so an unchanged file's blocks are the same wherever the new root puts them)."""
    running = booted or booted_slot()
    root = devices / f"root-{running}"
    size = erofs_bytes(root)
    mine = [e for e in entries(esp) if e.slot == running and e.state != "bad"]
    out: dict[str, Any] = {"block": block, "root": {"size": size, "hashes": block_hashes(root, size, block)}}
    if mine:
        uki = esp / ENTRIES / mine[0].file
        out["uki"] = {"file": mine[0].file, "size": uki.stat().st_size,
                      "hashes": block_hashes(uki, uki.stat().st_size, block)}
    return out


def _read_exact(src: IO[bytes], n: int) -> bytes:
    data = src.read(n)
    while len(data) < n and (more := src.read(n - len(data))):
        data += more
    if len(data) != n:
        raise SlotError(f"the payload ended {n - len(data)} bytes early")
    return data


def _assemble(src: IO[bytes], dst: IO[bytes] | None, size: int, plan: list[list[int]], old: IO[bytes] | None,
              block: int) -> str:
    """size bytes into dst (None: only their digest), as plan says: runs of [blocks, first block in
    old], or [blocks, -1] read from src; their sha256."""
    h = hashlib.sha256()
    pos = 0
    for count, start in plan:
        n = min(count * block, size - pos)
        if count <= 0 or n <= 0:
            raise SlotError("the update's plan runs past the end of what it builds")
        copy_from = old if start >= 0 else None
        if start >= 0:
            if copy_from is None:
                raise SlotError("the update's plan copies from what this device does not have")
            copy_from.seek(start * block)
        while n:
            piece = min(n, CHUNK)
            data = copy_from.read(piece) if copy_from else _read_exact(src, piece)
            if len(data) != piece:
                raise SlotError("the update's plan copies past the end of what this device has")
            if dst is not None:
                dst.write(data)
            h.update(data)
            pos += piece
            n -= piece
    if pos != size:
        raise SlotError(f"the update's plan builds {pos} bytes, not {size}")
    return h.hexdigest()


def _whole(size: int, block: int) -> list[list[int]]:
    """The plan that sends everything."""
    return [[-(-size // block), -1]] if size else []


def digest(path: Path, size: int, offset: int = 0) -> str:
    """The sha256 of size bytes of path from offset."""
    with open(path, "rb") as f:
        f.seek(offset)
        return _assemble(f, None, size, _whole(size, CHUNK), None, CHUNK)


def install(src: IO[bytes], *, name: str, root_size: int, root_sha256: str, uki_size: int, uki_sha256: str,
            esp: Path = ESP, devices: Path = Path("/dev/disk/by-partlabel"), booted: str | None = None,
            plan: dict[str, Any] | None = None, say: Any = print) -> dict[str, Any]:
    """The root (root_size bytes), then the UKI (uki_size bytes), from src, or as plan says (see
    sources(): {"block": size, "root": runs, "uki": runs}, each run [blocks, first block in the
    running root or UKI, or -1: from src}); each checked against its sha256 as it is written and the
    root again as read back, before the UKI makes it bootable."""
    if not _NAME.fullmatch(name):
        raise SlotError(f"not an appliance name: {name!r}")
    running = booted or booted_slot()
    target = "b" if running == "a" else "a"
    current = entries(esp)
    generation = max((e.generation for e in current), default=0) + 1
    block = int(plan["block"]) if plan else BLOCK
    if not 512 <= block <= CHUNK:
        raise SlotError(f"block size {block} out of range")
    uki_plan = (plan or {}).get("uki") or _whole(uki_size, block)
    old_uki = None  # read before the slot is written, when the plan copies from it
    if any(start >= 0 for _, start in uki_plan):
        running_uki = next((esp / ENTRIES / e.file for e in current if e.slot == running and e.state != "bad"), None)
        if running_uki is None:
            raise SlotError("the update reuses a UKI this device does not have")
        old_uki = io.BytesIO(running_uki.read_bytes())
    for e in current:  # nothing may boot the slot while it is rewritten
        if e.slot == target:
            (esp / ENTRIES / e.file).unlink()
            say(f"removed {e.file}")
    _fsync_dir(esp / ENTRIES)
    final = esp / ENTRIES / entry_name(name, generation, target)
    device = devices / f"root-{target}"
    with open(device, "r+b", buffering=0) as dst, open(devices / f"root-{running}", "rb") as old_root:
        got = _assemble(src, dst, root_size, plan["root"] if plan else _whole(root_size, block), old_root, block)
        dst.flush()
        os.fsync(dst.fileno())
    if got != root_sha256:
        raise SlotError(f"the root arrived damaged (sha256 {got}, expected {root_sha256}): "
                        f"slot {target} left unbootable")
    if digest(device, root_size) != root_sha256:
        raise SlotError(f"slot {target} reads back differently from what was written: left unbootable")
    say(f"wrote {root_size} bytes into slot {target}, verified")
    tmp = esp / ENTRIES / f".{final.name}.tmp"
    try:
        with open(tmp, "wb") as dst:
            got = _assemble(src, dst, uki_size, uki_plan, old_uki, block)
            dst.flush()
            os.fsync(dst.fileno())
        if got != uki_sha256:
            raise SlotError(f"the kernel image arrived damaged (sha256 {got}, expected {uki_sha256})")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.rename(tmp, final)
    _fsync_dir(esp / ENTRIES)
    say(f"installed {final.name}: the next boot tries slot {target} ({BOOT_TRIES} tries)")
    return {"slot": target, "generation": generation, "entry": final.name}


def fail_boot(esp: Path = ESP, run: Any = subprocess.run, booted: str | None = None) -> str:
    """This boot was unhealthy: when it was a try of a new entry and a blessed one exists to go back
    to, mark it bad (systemd-bless-boot bad: systemd-boot skips it from now on) and reboot."""
    booted = booted or booted_slot()
    try:
        current = entries(esp)
    except FileNotFoundError:  # a Raspberry Pi's boot partition: its firmware counts no tries
        return "staying: this boot loader counts no tries (no EFI/Linux entries)"
    trying = [e for e in current if e.slot == booted and e.state == "trying"]
    fallback = [e for e in current if e.slot != booted and e.state == "good"]
    if not trying or not fallback:
        return "staying: nothing to go back to" if trying else "staying: this entry is not on trial"
    run(["/usr/lib/systemd/systemd-bless-boot", "bad"], check=True)
    run(["systemctl", "--no-block", "reboot"], check=True)
    return f"marked {trying[0].file} bad; rebooting into {fallback[0].file}"


def rollback(esp: Path = ESP, run: Any = subprocess.run, booted: str | None = None) -> str:
    """Boot the other slot's root now, when it has a blessed entry: this root's entries are marked
    bad (+0, as systemd-boot's counting leaves a failed entry), then the device reboots."""
    booted = booted or booted_slot()
    current = entries(esp)
    if not [e for e in current if e.slot != booted and e.state == "good"]:
        raise SlotError("the other slot has no blessed root to go back to")
    for e in current:
        if e.slot == booted:
            bad = esp / ENTRIES / f"{e.name}-{e.generation}-{e.slot}+0-{e.tries_done}.efi"
            os.rename(esp / ENTRIES / e.file, bad)
    _fsync_dir(esp / ENTRIES)
    run(["systemctl", "--no-block", "reboot"], check=True)
    return f"slot {booted} marked bad; rebooting into slot {'b' if booted == 'a' else 'a'}"


def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="appliance-dataplane slot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status", help="booted slot, boot entries, health (JSON)")
    sub.add_parser("sources", help="the running root's and UKI's block hashes (JSON), for an update to send "
                                   "only what changed")
    p_install = sub.add_parser("install", help="write a root and its UKI from stdin into the other slot")
    p_install.add_argument("--name", required=True)
    p_install.add_argument("--plan", action="store_true",
                           help="the payload starts with a JSON line {\"block\": N, \"root\": runs, \"uki\": runs}: "
                                "which blocks come from the running root and UKI instead of the payload")
    for what in ("root", "uki"):
        p_install.add_argument(f"--{what}-size", type=int, required=True)
        p_install.add_argument(f"--{what}-sha256", required=True)
    sub.add_parser("fail-boot", help="mark an unhealthy trial boot bad and reboot into the previous root")
    sub.add_parser("rollback", help="mark this root bad and reboot into the other slot's blessed root")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "status":
            print(json.dumps(status(), sort_keys=True))
        elif args.cmd == "sources":
            print(json.dumps(sources()))
        elif args.cmd == "install":
            plan = None
            if args.plan:
                plan = json.loads(sys.stdin.buffer.readline())
                if not isinstance(plan, dict) or not all(isinstance(r, list) and len(r) == 2 and
                                                         all(isinstance(x, int) for x in r)
                                                         for k in ("root", "uki") for r in plan.get(k) or []):
                    raise SlotError("the update's plan is not a plan")
            result = install(sys.stdin.buffer, name=args.name, root_size=args.root_size, root_sha256=args.root_sha256,
                             uki_size=args.uki_size, uki_sha256=args.uki_sha256, plan=plan,
                             say=lambda m: print(m, file=sys.stderr, flush=True))
            print(json.dumps(result, sort_keys=True))
        elif args.cmd == "rollback":
            print(rollback(), flush=True)
        else:
            print(fail_boot(), flush=True)
    except (SlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
