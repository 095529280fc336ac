"""`appliance update` and `appliance status`: an image's root onto a running device, over SSH.

The device runs one root slot; the update writes the new root into the other one (the device's
`appliance-dataplane slot install`, which checks every byte's sha256 before it makes the root
bootable), with its UKI under the next generation and boot counting's +3, then reboots into it.
The new root is kept only if it comes up healthy: systemd-bless-boot marks it good after
appliance-health has passed; an unhealthy trial boot marks itself bad and reboots into the root it
came from (`slot fail-boot`), and a boot that hangs or panics uses up its tries. The host then finds
the device on one of the two roots and says which: updated, rolled back (with the device's reason)
or unreachable."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from hashlib import sha256
from pathlib import Path
from typing import Any

from .dataplane.slots import BLOCK, CHUNK, block_digest, block_hashes, erofs_bytes
from .errors import ApplianceError, InputError
from .image.disk import DiskIds, Slot, kernel_cmdline, layout, uki_entry
from .image.platform import HOST, Platform
from .image.provenance import Source, downgrade
from .image.run import NULL_LOG
from .image.spec import ImageSpec
from .image.tools import ToolsTree
from .runner import CommandFailed, run, spawn

EXIT_ROLLED_BACK = 3
EXIT_UNREACHABLE = 4
REMOTE_TOOL = "/usr/sbin/appliance-dataplane"


class Outcome(StrEnum):
    UPDATED = "updated"
    ROLLED_BACK = "rolled back"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class Target:
    """[USER@]HOST[:PORT], with the user's ssh settings (an ssh_config file, as -F)."""

    host: str
    port: int | None = None
    ssh_config: Path | None = None

    @classmethod
    def parse(cls, spec: str, ssh_config: Path | None = None) -> Target:
        host, port = spec, None
        if ":" in spec and not spec.startswith("["):
            host, _, p = spec.rpartition(":")
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise InputError(f"--host {spec!r}: the port after ':' must be a number from 1 to 65535")
            port = int(p)
        user, _, name = host.rpartition("@")
        if not name or name.startswith("-") or any(c.isspace() for c in host) or (user and user.startswith("-")):
            raise InputError(f"--host {spec!r}: expected [USER@]HOST[:PORT]")
        return cls(host if "@" in host else f"root@{host}", port, ssh_config)

    def ssh(self, command: str, **options: str) -> list[str]:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "ServerAliveInterval=5"]
        cmd += [x for k, v in options.items() for x in ("-o", f"{k}={v}")]
        if self.ssh_config:
            cmd += ["-F", str(self.ssh_config)]
        if self.port:
            cmd += ["-p", str(self.port)]
        return [*cmd, "--", self.host, command]

    def run(self, command: str, timeout: float = 60, compress: bool = False) -> subprocess.CompletedProcess[str]:
        options = {"Compression": "yes"} if compress else {}
        return run(self.ssh(command, **options), check=False, timeout=timeout, what=f"ssh {self.host}")

    def status(self, timeout: float = 30) -> dict[str, Any] | None:
        """The device's `slot status`, or None when it does not answer."""
        try:
            proc = self.run(f"{REMOTE_TOOL} slot status", timeout=timeout)
            return dict(json.loads(proc.stdout)) if proc.returncode == 0 else None
        except (CommandFailed, ValueError):
            return None


Runs = list[list[int]]  # [blocks, first block in the device's copy, or -1: sent]


@dataclass(frozen=True)
class Payload:
    """What an update sends: the image's root file system (slot A's bytes, as long as the file
    system is) and its UKI with the command line naming the slot it goes into; with a plan, only
    the blocks the device does not have (its running root and UKI, `slot sources`)."""

    image: Path
    root_offset: int
    root_size: int
    root_sha256: str
    uki: bytes
    block: int = BLOCK
    plan: dict[str, Runs] | None = None
    root_blocks: tuple[str, ...] = ()  # block_digest of each block of the root (payload() reads them)

    @property
    def uki_sha256(self) -> str:
        return sha256(self.uki).hexdigest()

    def _sent(self, runs: Runs, size: int) -> int:
        total, pos = 0, 0
        for count, start in runs:
            n = min(count * self.block, size - pos)
            total += n if start < 0 else 0
            pos += n
        return total

    @property
    def bytes_to_send(self) -> int:
        if not self.plan:
            return self.root_size + len(self.uki)
        return self._sent(self.plan["root"], self.root_size) + self._sent(self.plan["uki"], len(self.uki))

    def stream(self) -> Iterator[bytes]:
        """What `slot install` reads: with a plan, a JSON line of it, then the blocks it says are sent."""
        if not self.plan:
            yield from self._root_range(0, self.root_size)
            yield self.uki
            return
        yield json.dumps({"block": self.block, **self.plan}, separators=(",", ":")).encode() + b"\n"
        pos = 0
        for count, start in self.plan["root"]:
            n = min(count * self.block, self.root_size - pos)
            if start < 0:
                yield from self._root_range(pos, n)
            pos += n
        pos = 0
        for count, start in self.plan["uki"]:
            n = min(count * self.block, len(self.uki) - pos)
            if start < 0:
                yield self.uki[pos:pos + n]
            pos += n

    def _root_range(self, start: int, length: int) -> Iterator[bytes]:
        with open(self.image, "rb") as f:
            f.seek(self.root_offset + start)
            while length:
                data = f.read(min(CHUNK, length))
                if not data:
                    raise ApplianceError(f"{self.image} ends inside its root file system")
                yield data
                length -= len(data)

    def with_plan(self, device: dict[str, Any]) -> Payload:
        """Reuse every block the device's running root or UKI already has (`slot sources`)."""
        if device.get("block") != self.block:
            return self
        mine = (list(self.root_blocks) if self.root_blocks and self.block == BLOCK
                else block_hashes(self.image, self.root_size, self.block, self.root_offset))
        root = _runs(mine, (device.get("root") or {}).get("hashes") or [])
        uki_hashes = [block_digest(self.uki[i:i + self.block]) for i in range(0, len(self.uki), self.block)]
        uki = _runs(uki_hashes, (device.get("uki") or {}).get("hashes") or [])
        return dataclasses.replace(self, plan={"root": root, "uki": uki})


def _runs(mine: list[str], theirs: list[str]) -> Runs:
    """mine as runs of blocks: copied from where theirs has each (consecutive blocks stay one run), or sent."""
    where: dict[str, int] = {}
    for i, h in enumerate(theirs):
        where.setdefault(h, i)
    runs: Runs = []
    for h in mine:
        src = where.get(h, -1)
        if runs and ((src == -1 and runs[-1][1] == -1) or
                     (src >= 0 and runs[-1][1] >= 0 and src == runs[-1][1] + runs[-1][0])):
            runs[-1][0] += 1
        else:
            runs.append([1, src])
    return runs


def erofs_size(image: Path, offset: int) -> int:
    """The erofs file system's length at offset (its superblock)."""
    size = erofs_bytes(image, offset)
    if not size:
        raise ApplianceError(f"{image}: no erofs root in slot A (an image from before A/B slots?)")
    return size


def extract_uki(tools: ToolsTree, image: Path, name: str, work: Path) -> bytes:
    out = work / "uki.efi"
    tools.run(["mcopy", "-n", "-i", f"{image}@@{layout().esp_offset}", f"::/{uki_entry(name)}", out],
              binds=[image.parent, work], log=NULL_LOG, what="mcopy (the image's UKI)", env={"MTOOLS_SKIP_CHECK": "1"})
    data = out.read_bytes()
    out.unlink()
    return data


def retarget_uki(uki: bytes, name: str, vm: bool, slot: Slot, plat: Platform = HOST) -> bytes:
    """The UKI with its command line naming slot instead of A: the two command lines have the same
    length, so the PE file's layout does not change."""
    ids = DiskIds.for_name(name)
    was, now = (kernel_cmdline(ids, s, vm=vm, serial=plat.serial).encode() for s in (Slot.A, slot))
    if len(was) != len(now) or uki.count(was) != 1:
        raise ApplianceError("the image's UKI does not hold the command line this build gave it")
    return uki.replace(was, now)


def payload(tools: ToolsTree, image: Path, name: str, vm: bool, slot: Slot, work: Path,
            plat: Platform = HOST) -> Payload:
    """The image's root, read once for its sha256 and its blocks' digests, and its UKI for slot."""
    offset = layout().slot_offset(Slot.A)
    size = erofs_size(image, offset)
    h, blocks = sha256(), []
    with open(image, "rb") as f:
        f.seek(offset)
        for start in range(0, size, BLOCK):
            data = f.read(min(BLOCK, size - start))
            h.update(data)
            blocks.append(block_digest(data))
    uki = retarget_uki(extract_uki(tools, image, name, work), name, vm, slot, plat)
    return Payload(image, offset, size, h.hexdigest(), uki, root_blocks=tuple(blocks))


def problems(verdict: dict[str, Any] | None) -> str:
    """A health verdict's problems (appliance.dataplane.health), as one line."""
    return "; ".join(f"{k}: {v}" for k, v in sorted(((verdict or {}).get("problems") or {}).items()))


@dataclass
class UpdateReport:
    outcome: Outcome
    host: str
    slot: str = ""
    entry: str = ""
    sent_bytes: int = 0  # over the wire (zstd)
    payload_bytes: int = 0  # the chunks the device did not have, and the UKI
    root_bytes: int = 0  # the whole root and UKI
    sources_bytes: int = 0  # the device's block list (uncompressed; ssh compresses it)
    seconds: dict[str, float] = field(default_factory=dict)
    reason: dict[str, Any] | None = None  # the device's last unhealthy verdict, after a rollback
    status: dict[str, Any] | None = None

    def why(self) -> str:
        """The device's reason for a rollback, as one line."""
        return problems(self.reason)

    def to_json(self) -> dict[str, Any]:
        return {"outcome": str(self.outcome), "host": self.host, "slot": self.slot, "entry": self.entry,
                "sent_bytes": self.sent_bytes, "payload_bytes": self.payload_bytes, "root_bytes": self.root_bytes,
                "sources_bytes": self.sources_bytes,
                "seconds": self.seconds,
                "reason": self.reason, "status": self.status}


def send(target: Target, p: Payload, name: str, progress: Callable[[int, int], None]) -> tuple[dict[str, Any], int]:
    """Stream the payload, zstd-compressed, into `slot install` on the device: (its result, the bytes
    that went over the wire)."""
    remote = (f"zstd -dc | {REMOTE_TOOL} slot install --name {shlex.quote(name)} {'--plan ' if p.plan else ''}"
              f"--root-size {p.root_size} --root-sha256 {p.root_sha256} "
              f"--uki-size {len(p.uki)} --uki-sha256 {p.uki_sha256}")
    total, done, sent = p.bytes_to_send, 0, 0
    zstd = spawn(["zstd", "-q", "-c", "-3", "-T0"], stdin=subprocess.PIPE, output=subprocess.PIPE, errors=None)
    ssh = spawn(target.ssh(remote), stdin=subprocess.PIPE, output=subprocess.PIPE, errors=subprocess.PIPE)
    assert zstd.stdin and zstd.stdout and ssh.stdin and ssh.stdout and ssh.stderr

    def feed() -> None:  # the compressor's input, while this thread forwards its output
        assert zstd.stdin
        nonlocal done
        try:
            for chunk in p.stream():
                zstd.stdin.write(chunk)
                done += len(chunk)
                progress(done, total)
        except BrokenPipeError:
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                zstd.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        while data := zstd.stdout.read(1 << 16):
            sent += len(data)
            ssh.stdin.write(data)
        ssh.stdin.close()
        out, err = ssh.stdout.read(), ssh.stderr.read()
        ssh.wait(timeout=600)
    except BrokenPipeError:
        out, err = b"", ssh.stderr.read()
        ssh.wait(timeout=60)
    finally:  # the compressor first: a feeder blocked on it ends with it
        for proc in (zstd, ssh):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        feeder.join(timeout=60)
    if ssh.returncode != 0:
        why = err.decode(errors="replace").strip()[-2000:] or f"ssh exited {ssh.returncode}"
        raise ApplianceError(f"the device did not take the update: {why}")
    return dict(json.loads(out)), sent


def wait_for_verdict(target: Target, before: str, timeout: float, poll: float = 5) -> dict[str, Any] | None:
    """The device's status once it has rebooted (a new boot id) and its entries say how the boot
    went: the booted entry blessed (good), or the device back on the other slot. None: no such
    answer within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = target.status(timeout=20)
        if st and st.get("boot_id") != before:
            booted = st["booted_slot"]
            mine = [e for e in st["entries"] if e["slot"] == booted]
            if mine and mine[0]["state"] == "good":
                return st
        time.sleep(poll)
    return None


def reboot(target: Target) -> None:
    # in the background, so that ssh returns before the connection goes
    target.run("systemd-run --no-block --on-active=1 systemctl reboot", timeout=30)


def require_updatable(spec: ImageSpec) -> None:
    """Updates in the field fall back to the running root through UEFI boot counting (systemd-boot)."""
    if spec.boot.kind != "uefi":
        raise InputError(f"{spec.name}: updates in the field need UEFI boot counting (systemd-boot) to fall back "
                         f"to the running root; a {spec.board} boots through its own firmware, and A/B with the "
                         f"Pi's tryboot is not built yet: flash the new image instead (`appliance flash`)")


def update(target: Target, image: Path, spec: ImageSpec, tools: ToolsTree, work: Path, *,
           progress: Callable[[int, int], None], say: Callable[[str], None], boot_timeout: float = 600,
           reuse: bool = True, source: Source | None = None, repo: Path | None = None,
           allow_downgrade: bool = False) -> UpdateReport:
    """The whole update of one device to spec's image: its status, the payload for its other slot,
    the transfer, the reboot, and the verdict. reuse=False sends every block, none taken from the
    running root. source: the image's commit (provenance), compared with the device's in repo: an
    older one is refused unless allow_downgrade."""
    name = spec.name
    require_updatable(spec)
    report = UpdateReport(Outcome.UNREACHABLE, target.host)
    t0 = time.monotonic()
    before = target.status()
    if before is None:
        return report
    running = before["release"].get("name")
    if running and running != name:
        raise InputError(f"{target.host} runs appliance {running!r}, not {name!r}: wrong host or profile")
    older = downgrade(Source.from_json(before["release"].get("source")), source, repo)
    if older and not allow_downgrade:
        raise InputError(f"{target.host}: refusing to downgrade: {older} (--allow-downgrade to do it anyway)")
    slot = Slot(before["booted_slot"]).other
    p = payload(tools, image, name, spec.vm, slot, work, spec.platform)
    has = target.run(f"{REMOTE_TOOL} slot sources", timeout=600, compress=True) if reuse else None
    if has is not None and has.returncode == 0:
        p = p.with_plan(json.loads(has.stdout))
        report.sources_bytes = len(has.stdout)
    report.payload_bytes = p.bytes_to_send
    report.root_bytes = p.root_size + len(p.uki)
    say(f"{target.host}: slot {before['booted_slot']} running; writing slot {slot}")
    result, report.sent_bytes = send(target, p, name, progress)
    report.slot, report.entry = result["slot"], result["entry"]
    report.seconds["transfer"] = round(time.monotonic() - t0, 1)
    say(f"{target.host}: {result['entry']} installed; rebooting")
    t1 = time.monotonic()
    reboot(target)
    after = wait_for_verdict(target, before["boot_id"], boot_timeout)
    report.seconds["reboot_to_verdict"] = round(time.monotonic() - t1, 1)
    report.status = after
    if after is None:
        return report
    if after["booted_slot"] == slot:
        report.outcome = Outcome.UPDATED
    else:
        report.outcome = Outcome.ROLLED_BACK
        report.reason = after.get("last_unhealthy")
    return report
