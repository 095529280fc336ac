"""Boot an appliance image in QEMU: UEFI (OVMF), a snapshot overlay so the image is never modified,
the serial console captured to a file, KVM when it works and TCG otherwise.

NICs: one QEMU user-mode NIC for management (SSH forwarded to 127.0.0.1:PORT), plus TAP devices for
the lab. The TAPs are made in the caller's network namespace and handed to QEMU open; the lab may
move them into its own namespaces (and records where in VM.moved, for a power cycle); they vanish
with the VM."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..image.platform import HOST, Platform
from ..runner import CommandFailed, run, spawn
from .firmware import uefi_firmware

MGMT_MAC = "52:54:00:aa:00:01"


class VMError(CommandFailed):
    pass


@dataclass(frozen=True)
class Nic:
    tap: str  # created by the runner, removed with the VM
    mac: str


@functools.cache
def kvm_works(plat: Platform = HOST) -> bool:
    """Whether QEMU can actually run a guest with KVM here (a /dev/kvm node alone is not enough): only
    for the host's own architecture."""
    if plat != HOST or not os.access("/dev/kvm", os.R_OK | os.W_OK) or not shutil.which(plat.qemu):
        return False
    try:
        proc = run([plat.qemu, "-accel", "kvm", "-machine", plat.qemu_machine, "-cpu", "host", "-nodefaults",
                    "-display", "none", "-no-reboot", "-bios", "/dev/null", "-m", "64"], check=False, timeout=5)
    except CommandFailed:  # it ran (and would run forever with an empty BIOS): KVM works
        return True
    return proc.returncode == 0 and "kvm" not in proc.stderr.lower()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VM:
    image: Path
    workdir: Path
    nics: list[Nic] = field(default_factory=list)
    memory_mib: int = 1024
    cpus: int = 2
    ssh_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    # writes go to the image itself, and the guest may reboot (updates): for a copy of an image
    persistent: bool = False
    plat: Platform = HOST  # the image's architecture
    # devices of real hardware (an AHCI/SATA or NVMe disk, Intel e1000e NICs) instead of virtio: what
    # a generic image's kernel and initramfs must find by themselves on a box
    hardware: bool = False
    # where the lab moved each TAP (its name at start -> (namespace, name there)), for a power cycle
    moved: dict[str, tuple[str, str]] = field(default_factory=dict)
    power_cycles: list[float] = field(default_factory=list)  # seconds after start, each time the plug was pulled
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cycling: bool = False

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    @property
    def accel(self) -> list[str]:
        return (["-accel", "kvm", "-cpu", "host"] if kvm_works(self.plat)
                else ["-accel", "tcg,thread=multi", "-cpu", self.plat.tcg_cpu])

    def command(self, *, console: str | None = None, snapshot: bool = True, tap_fds: Sequence[int] = ()) -> list[str]:
        """QEMU's command line. console: the serial port's backend (default: appended to a file,
        self.console); snapshot: writes go to a throwaway overlay, not the image; tap_fds: the lab's
        TAPs, opened for QEMU (one per NIC)."""
        firmware = uefi_firmware(self.plat.firmware_arch, self.plat.firmware_machine)
        overlay = ",snapshot=on" if snapshot else ""
        vars_copy = self.workdir / "OVMF_VARS.fd"
        if not vars_copy.exists():  # a power cycle keeps the firmware's variables, as a board's flash does
            shutil.copy(firmware.vars_template, vars_copy)
        # -nodefaults: no VGA, CD drive, parallel port for the firmware and the kernel to set up and
        # udev to process; bootindex: the firmware tries the disk first (not the CD, not the network);
        # smm=off: this OVMF build has no SMM. Together 0.7 s less firmware under TCG.
        cmd = [self.plat.qemu, "-name", "appliance", "-nodefaults", "-machine", self.plat.qemu_machine, *self.accel,
               "-smp", str(self.cpus), "-m", str(self.memory_mib),
               "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}",
               "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
               "-drive", f"if=none,id=disk,format=raw,file={self.image}{overlay},cache=unsafe",
               *self._disk_device(),
               "-netdev", f"user,id=mgmt,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
               # romfile=: no iPXE option ROM for OVMF to load (and run) for each NIC; the image boots from disk
               "-device", f"{self._nic_model},netdev=mgmt,mac={MGMT_MAC},romfile="]
        for i, (nic, fd) in enumerate(zip(self.nics, tap_fds, strict=True)):
            cmd += ["-netdev", f"tap,id=lab{i},fd={fd}",
                    "-device", f"{self._nic_model},netdev=lab{i},mac={nic.mac},romfile="]
        cmd += ["-object", "rng-random,id=rng,filename=/dev/urandom", "-device", "virtio-rng-pci,rng=rng"]
        if self.plat.vm_watchdog:  # a hardware watchdog, as boards have: a hung system is reset (a failed boot try)
            cmd += ["-device", self.plat.vm_watchdog, "-action", "watchdog=reset"]
        cmd += ["-display", "none"]
        # an interactive console multiplexes QEMU's monitor (Ctrl-A C); a lab's goes to a file, kept
        # across power cycles
        serial = f"file,id=serial,path={self.console},append=on"
        cmd += ["-serial", console] if console else ["-monitor", "none", "-chardev", serial, "-serial",
                                                     "chardev:serial"]
        # a lab VM's reboot ends QEMU (a panic is a failure), unless the test reboots it on purpose
        return cmd if self.persistent else [*cmd, "-no-reboot"]

    def _disk_device(self) -> list[str]:
        if self.hardware:
            return HARDWARE_DISKS[self.plat.hardware_disk][0]
        return ["-device", "virtio-blk-pci,drive=disk,bootindex=0"]

    @property
    def _nic_model(self) -> str:
        return "e1000e" if self.hardware else "virtio-net-pci"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for nic in self.nics:  # persistent: the lab's addresses and servers on it outlive a power cycle
            run(["ip", "tuntap", "add", nic.tap, "mode", "tap", "vnet_hdr"], error=VMError)
            run(["ip", "link", "set", nic.tap, "up"], error=VMError)
        self.started = time.monotonic()
        self._launch()
        if self.proc is not None and self.proc.poll() is not None:
            raise VMError(f"qemu exited at once: {(self.workdir / 'qemu.log').read_text()[-2000:]}")

    def _launch(self) -> None:
        """Start QEMU on the TAPs wherever they are now: it is handed them open, so the lab may move
        them into its namespaces at any time (and they stay there across a power cycle)."""
        fds = [open_tap(*self.moved.get(nic.tap, (None, nic.tap))) for nic in self.nics]
        try:
            with open(self.workdir / "qemu.log", "ab") as log:
                # TMPDIR: where the snapshot overlay goes
                self.proc = spawn(self.command(snapshot=not self.persistent, tap_fds=fds), output=log,
                                  env={"TMPDIR": str(self.workdir)}, new_session=True, pass_fds=fds)
        finally:
            for fd in fds:
                os.close(fd)

    def power_cycle(self) -> None:
        """Pull the plug and plug it in again: QEMU is killed (the guest has no warning, as in a power
        cut) and starts again on the same disk, firmware variables and lab NICs."""
        with self._lock:
            self._cycling = True
            try:
                self.power_cycles.append(round(self.seconds(), 1))
                self._kill()
                self._launch()
            finally:
                self._cycling = False

    def unstick_reboots(self, stop: threading.Event, grace: float = 30.0, silence: float = 120.0) -> list[str]:
        """Until stop: power-cycle the VM when the guest has said "reboot: Restarting system" and the
        firmware has not started again within grace seconds. Multi-threaded TCG (QEMU 7.2) here
        sometimes wedges in the guest's reset (one vCPU at 100 %, nothing more on the console, and
        the monitor's system_reset does not get through); hardware resets at once. The guest had
        finished shutting down when it said so: cutting the power then is what a reset is.
        The same wedge one step later: the firmware has started the boot loader and the console has
        said nothing since, for silence seconds (a quiet kernel speaks first when systemd starts,
        ~5 s after the firmware under TCG here; once, in CI, never in 240 s after a reboot); then
        the kernel never got going, and a watchdog, which systemd arms, was never armed.
        Returns when it did and which of the two it was ("188.1 s: silent after the boot loader")."""
        pressed: list[str] = []
        since: float | None = None
        length, changed = -1, time.monotonic()
        while not stop.wait(2.0):
            console, now = self.console_text(), time.monotonic()
            if len(console) != length:
                length, changed = len(console), now
            stuck = reboot_pending(console)
            if not stuck:
                since = None
            elif since is None:
                since = now
            if stuck and since is not None and now - since > grace:
                why = "no firmware after the reboot"
            elif silent_since_loader(console) and now - changed > silence:
                why = "silent after the boot loader"
            else:
                continue
            self.power_cycle()
            pressed.append(f"{self.power_cycles[-1]} s: {why}")
            since, changed = None, time.monotonic()
        return pressed

    def running(self) -> bool:
        return self._cycling or (self.proc is not None and self.proc.poll() is None)

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def _kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        with self._lock:
            self._kill(signal.SIGTERM)
        for nic in self.nics:  # persistent TAPs: removed here, wherever the lab put them
            ns, name = self.moved.get(nic.tap, (None, nic.tap))
            run(["ip", *(["-n", ns] if ns else []), "link", "del", name], check=False)


def run_interactive(image: Path, persist: bool = False, plat: Platform = HOST, hardware: bool = False) -> int:
    """Boot the image with the serial console on this terminal (Ctrl-A X quits QEMU)."""
    workdir = Path(tempfile.mkdtemp(prefix="appliance-run-"))
    try:
        vm = VM(image, workdir, plat=plat, hardware=hardware)
        cmd = vm.command(console="mon:stdio", snapshot=not persist)
        print(f"SSH: ssh -p {vm.ssh_port} root@127.0.0.1   (serial console below; Ctrl-A X quits)", flush=True)
        return spawn(cmd, env={"TMPDIR": str(workdir)}).wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def silent_since_loader(console: str) -> bool:
    """The firmware has started the boot loader and nothing has come on the console since."""
    start = console.rfind("BdsDxe: starting")
    return start >= 0 and not console[start:].partition("\n")[2].strip()


def reboot_pending(console: str) -> bool:
    """The guest said it restarts, and the firmware has not started since (a reset underway, or hung)."""
    return console.rfind("reboot: Restarting system") > console.rfind("BdsDxe: loading")


TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
CLONE_NEWNET = 0x40000000


def _exists(name: str, ns: str | None) -> None:
    """TUNSETIFF makes a new TAP for a name it does not find: QEMU would sit on an unconnected one."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise VMError(f"no TAP {name} {f'in {ns}' if ns else 'here'}: the lab lost track of it") from None


def open_tap(ns: str | None, name: str) -> int:
    """An open queue of the existing TAP `name` in network namespace ns (None: this one), for QEMU's
    -netdev tap,fd=. A TAP belongs to the namespace /dev/net/tun was opened in, so this thread
    enters ns just for the open (setns: Python 3.11 has no os.setns)."""
    if ns is None:
        _exists(name, ns)
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{ns}") as there:
            if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
                raise VMError(f"cannot enter network namespace {ns}: {os.strerror(ctypes.get_errno())}")
            try:
                _exists(name, ns)
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            finally:
                if libc.setns(home.fileno(), CLONE_NEWNET) != 0:  # this thread must not stay in the lab
                    os._exit(70)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as e:
        os.close(fd)
        raise VMError(f"cannot open TAP {name}{f' in {ns}' if ns else ''}: {e.strerror}") from None
    return fd


@contextlib.contextmanager
def running(image: Path, nics: list[Nic], workdir: Path | None = None, persistent: bool = False,
            plat: Platform = HOST, hardware: bool = False) -> Iterator[VM]:
    """A started VM, stopped and cleaned up however the block ends (exceptions, Ctrl-C)."""
    own = workdir is None
    wd = workdir or Path(tempfile.mkdtemp(prefix="appliance-vm-"))
    vm = VM(image, wd, nics, persistent=persistent, plat=plat, hardware=hardware)
    try:
        vm.start()
        yield vm
    finally:
        vm.stop()
        if own:
            shutil.rmtree(wd, ignore_errors=True)


# Platform.hardware_disk -> QEMU's devices for it, and the name the guest's kernel gives the disk
HARDWARE_DISKS = {
    "ahci": (["-device", "ich9-ahci,id=ahci", "-device", "ide-hd,drive=disk,bus=ahci.0,bootindex=0"], "sd"),
    "nvme": (["-device", "nvme,drive=disk,serial=appliance,bootindex=0"], "nvme"),
}


def lab_devices(hardware: bool, plat: Platform = HOST) -> dict[str, str]:
    """What the guest sees of VM.hardware's devices: its NICs' driver, its disk's name."""
    if hardware:
        return {"nic_driver": "e1000e", "disk_prefix": HARDWARE_DISKS[plat.hardware_disk][1]}
    return {"nic_driver": "virtio_net", "disk_prefix": "vd"}
