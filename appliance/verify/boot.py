"""`appliance test`: build a lab variant of the image, boot it in QEMU inside a lab network, and run
the testinfra suite generated from the profile, with real traffic through the tunnel.

The lab variant differs from the image you flash only where a lab must: each declared peer's public
key is replaced by a key the lab holds (so the lab can be every peer, with that peer's ACLs), the
lab's SSH key is authorised, the NICs are matched by the lab's MACs, and a QEMU management NIC gets
an address (no routes) so testinfra can log in over 127.0.0.1.

  wan  (the internet / upstream): the uplink TAP, DHCP and router advertisements (dnsmasq), the
       upstream server (IPv4, and IPv6 when the uplink has it)
  lan  (subnet routers): the LAN TAP and a LAN host
  peer-N: one namespace per declared peer, wireguard-go with the config `appliance peer` prints"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LabError
from ..image import BuildManifest, BuildOptions, BuildResult, Cache, ProfileInfo, build_loaded, image_spec
from ..image.assemble import copy_sparse
from ..image.disk import DiskIds, Slot, uki_entry
from ..image.provenance import Source
from ..peer_config import client_config, routes_for_peer
from ..profile import Profile
from ..profile.model import StaticIPv6
from ..render import ConfigTree
from ..runner import CommandFailed, run
from ..secrets import SecretStore, appliance_keys, public_key
from . import probe
from .cases import (
    LAN_MAC,
    UPLINK_MAC,
    WAN_GATEWAY,
    WAN_GATEWAY6,
    WAN_PREFIX6,
    LabPeer,
    lab_variant,
    lan_host,
    masquerades,
    traffic_cases,
    uplink_ipv6,
)
from .netns import Lab, LabCommandFailed, protocol_counters, split_wg_quick, start_peer, wait_for
from .raspi import prove_image as prove_raspi_image
from .static import verify_tree
from .suite import run_suite
from .vm import MGMT_MAC, VM, Nic, lab_devices, running

UPLINK_LEASE = "198.18.30.128"  # the lab's DHCP server reserves it for UPLINK_MAC
WAN_NET = "198.18.30.0/24"
PORTS = [22, 443, 7000, 8080]
LAB_DOMAIN = "lab.example"
REARM_S = 1.0  # how often a lab peer whose handshake is unanswered starts a new one (WireGuard: 5 s)
SUITE = Path(__file__).with_name("boot_suite.py")

MGMT_NETWORK = f"""# lab only: QEMU's management NIC, for testinfra over SSH; no routes, no DNS
[Match]
MACAddress={MGMT_MAC}

[Link]
RequiredForOnline=no

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
UseRoutes=no
UseGateway=no
UseDNS=no
UseDomains=no
"""

Step = Callable[[str], AbstractContextManager[None]]


@dataclass
class BootReport:
    name: str
    passed: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    output: str = ""
    console: str = ""
    accel: str = ""
    emulator_faults: list[str] = field(default_factory=list)  # consoles of boots retried (emulator_fault)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.passed > 0


def emulator_fault(console: str) -> str:
    """Whether a boot died of QEMU's TCG rather than of the image: the kernel live-patches its own
    code (static keys, at init and when systemd first enables a cgroup controller) with a temporary
    int3, and multi-threaded TCG lets the other vCPU still run the breakpoint after the patch is
    done: "Oops: int3" and a panic, in ~1 of 20 boots here (QEMU 7.2), at any point of the boot.
    Also a boot during which the host starved the emulated CPUs: the guest's clock (the host's) ran on
    while a vCPU did not, the kernel says so ("rcu: INFO: rcu_sched self-detected stall on CPU", a
    vCPU stuck for 21 s of a boot that takes 25 here when the host is idle), and the guest's own
    timeouts (a mount's 90 s, a disk command's 30 s) expire on work that never ran: /var failed to
    mount in such a boot. A kernel on a real CPU says that only for its own bug.
    Such a boot is retried once, and the report keeps its console; any other death is a failure.
    Returns the kernel's line that says which ("" when neither)."""
    if "Kernel panic" in console and (oops := re.search(r"Oops: int3.*", console)):
        return oops.group(0).strip()
    stall = _RCU_STALL.search(console)
    return stall.group(0).strip() if stall else ""


_RCU_STALL = re.compile(r"rcu: INFO: rcu_\w+ (?:self-)?detected (?:expedited )?stalls?\b.*")


def _ssh_keypair(work: Path) -> tuple[Path, str]:
    key = work / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "appliance-lab", "-f", key], error=LabCommandFailed)
    return key, (work / "id_ed25519.pub").read_text().strip()


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(16).startswith(b"SSH-")
    except OSError:
        return False


class _SshWatch:
    """Polls the forwarded SSH port from the moment QEMU starts, apart from the lab's own setup
    (the DHCP lease and the peers come later), and notes when the banner first answers."""

    def __init__(self, port: int, clock: Callable[[], float], timings: dict[str, float]) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(port, clock, timings), daemon=True)

    def _poll(self, port: int, clock: Callable[[], float], timings: dict[str, float]) -> None:
        while not self._stop.is_set():
            if _banner(port):
                timings["boot_to_ssh"] = round(clock(), 1)
                return
            self._stop.wait(0.2)

    def __enter__(self) -> _SshWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _lease(path: Path, mac: str) -> str | None:
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1].lower() == mac:
            return parts[2]
    return None


@dataclass(frozen=True)
class LiveLab:
    lab: Lab
    wan: str
    profile: Profile
    peers: list[LabPeer]
    vm: VM
    uplink_ip: str
    lans: tuple[str | None, str | None]  # the LAN host's addresses (IPv4, IPv6)
    lan_ns: str | None
    arrivals: Path


@dataclass
class BootTest:
    profile: Profile
    cache: Cache
    step: Step
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="appliance-test-")))
    keep: bool = False
    timeout: float = 240.0
    sabotage: Callable[[ConfigTree], None] | None = None  # tests break the image on purpose
    # ... or its disk, once built (the image file, and the build that made it) before it boots
    disk_sabotage: Callable[[Path, BuildResult], None] | None = None
    # boot a copy of the image, written to and rebooted (updates); else a throwaway overlay, no reboot
    persistent_disk: bool = False
    lab_profile: Profile | None = None  # the lab variant booted (set by run)
    live: LiveLab | None = None  # the lab while the suite runs (for suites that reboot the appliance)
    resets: list[str] = field(default_factory=list)  # when and why the lab power-cycled a hung boot
    source: Source | None = None  # the commit the lab's images say they were built from
    built: BuildResult | None = None  # the last lab image's build (its manifest, its tools tree)

    def __post_init__(self) -> None:
        # The lab's limits, per what QEMU has to emulate (a failure still shows, later):
        spec = image_spec(self.profile)
        if spec.boot.kind == "rpi":
            # a whole Pi 4 (raspi4b: Cortex-A72, its SoC devices, no KVM whatever the host): its
            # firmware-less boot to multi-user.target is the one wait
            self.timeout *= 3
        elif spec.emulated and not spec.vm:
            # another architecture's full kernel and initramfs-tools, all emulated: such a generic
            # image's first handshake came 100-150 s after QEMU started here while the lab's CPU
            # emulated pointer authentication (26 s since, one boot: the margin stays); they double
            self.timeout *= 2

    @property
    def manifest(self) -> BuildManifest | None:
        return self.built.manifest if self.built else None

    def run(self) -> BootReport:
        report = BootReport(self.profile.name)
        try:
            return self._run(report)
        finally:
            if not self.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _build(self, lab_profile: Profile) -> Path:
        keys = appliance_keys(SecretStore(self.workdir / "secrets"), lab_profile)

        def adjust(tree: ConfigTree) -> None:
            tree.file("etc/systemd/network/05-lab-management.network", MGMT_NETWORK)
            if self.sabotage:
                self.sabotage(tree)

        options = BuildOptions(out_dir=self.workdir / "images", cache=self.cache, check_tree=verify_tree)
        info = ProfileInfo("lab variant", "", source=self.source)
        self.built = build_loaded(lab_profile, keys, info, options, self.step, adjust)
        return self.built.image

    def _run(self, report: BootReport) -> BootReport:
        key, ssh_pub = _ssh_keypair(self.workdir)
        # for the suite (testinfra's paramiko) and for a look inside when the lab does not come up
        (self.workdir / "ssh_config").write_text(
            f"Host *\n  User root\n  IdentityFile {key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        lab_profile, peers = lab_variant(self.profile, ssh_pub)
        self.lab_profile = lab_profile
        with self.step("build the lab variant of the image"):
            image = self._build(lab_profile)
        if self.persistent_disk:
            disk = self.workdir / "disk.img"
            with open(disk, "wb") as f:
                f.truncate(image.stat().st_size)
            copy_sparse(image, disk, 0)
            image = disk
        if self.disk_sabotage:
            assert self.built
            self.disk_sabotage(image, self.built)
        if image_spec(lab_profile).boot.kind == "rpi":
            return self._run_raspi(report, image)
        p = lab_profile
        for attempt in (1, 2):
            lab = Lab("b")
            try:
                result = self._boot(report, image, lab, p, peers)
                # the kernel may die of the emulator's fault mid-suite too (its checks then fail on a
                # rebooting device): that boot proves nothing either way and runs once more
                if result.ok or not self._retry(attempt, report):
                    return result
            except LabError as e:  # the lab did not come up: the console is the first place to look
                if not self._retry(attempt, report):
                    console = self._console()
                    raise LabError(f"{e}\n--- console, last 3000 characters ---\n{console[-3000:]}") from None
            finally:
                report.console = self._console()
                lab.close()
        raise LabError("unreachable")

    def _run_raspi(self, report: BootReport, image: Path) -> BootReport:
        """A Pi image: no lab network (QEMU's raspi4b has no Ethernet); its boot partition read and its
        boot to multi-user.target in raspi4b (verify/raspi.py says what that proves)."""
        spec = image_spec(self.profile)
        with self.step("boot partition and raspi4b boot to multi-user.target"):
            result = prove_raspi_image(image, spec.name, spec.boot, spec.platform, self.workdir / "raspi",
                                       timeout=self.timeout)
        report.accel = "tcg (raspi4b)"
        report.passed = sum(result.checks.values())
        report.failures = [c for c, ok in result.checks.items() if not ok]
        report.failed = len(report.failures)
        report.console = result.console
        report.output = "\n".join(f"{'PASSED' if ok else 'FAILED'} {c}" for c, ok in result.checks.items())
        if result.seconds:
            report.timings["multi_user"] = result.seconds
        return report

    def _retry(self, attempt: int, report: BootReport) -> bool:
        """Whether this failed first boot died of the emulator's fault (emulator_fault): then its
        results are cleared and the console put aside for the second boot."""
        console = self._console()
        if attempt != 1 or report.accel != "tcg" or not emulator_fault(console):
            return False
        report.emulator_faults.append(console[-3000:])
        report.timings.clear()
        report.failures.clear()
        report.passed = report.failed = 0
        report.output = ""
        (self.workdir / "vm").rename(self.workdir / "vm-emulator-fault")
        return True

    def _console(self) -> str:
        path = self.workdir / "vm" / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _boot(self, report: BootReport, image: Path, lab: Lab, p: Profile, peers: list[LabPeer]) -> BootReport:
        wan = lab.ns("wan")
        lan_ns = lab.ns("lan") if p.interfaces.lan else None
        arrivals = lab.dir / "arrivals.jsonl"
        # no duplicate address detection on the lab's side: the router's link-local address (which its
        # advertisements come from) is usable the moment the uplink's TAP arrives
        lab.run(wan, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                      "net.ipv6.conf.default.accept_dad=0"])
        lab.run(wan, ["nft", "-f", "-"], input=protocol_counters("tapu"))
        for i, peer in enumerate(peers):
            _peer_namespace(lab, wan, i, peer)
        tag = f"{os.getpid() % 10000}"
        nics = [Nic(f"aplu{tag}", UPLINK_MAC)] + ([Nic(f"apll{tag}", LAN_MAC)] if lan_ns else [])
        spec = image_spec(p)
        with (running(image, nics, self.workdir / "vm", persistent=self.persistent_disk,
                     plat=spec.platform, hardware=not spec.vm) as vm,
              _SshWatch(vm.ssh_port, vm.seconds, report.timings), self._unsticking(vm)):
            report.accel = "kvm" if "kvm" in vm.accel else "tcg"
            with self.step(f"boot in QEMU ({report.accel}), lab network, peers"):
                _attach(lab, vm, wan, nics[0].tap, "tapu")
                # the whole lab is ready while the appliance boots: its first answer is timed, not the lab's start
                uplink_ip, leased = self._uplink(lab, wan, p, arrivals, vm)
                lan, lan6 = lan_host(p), lan_host(p, 6)
                if lan_ns and lan:
                    self._lan(lab, vm, lan_ns, nics[1].tap, p, lan, lan6, arrivals)
                for peer in peers:
                    self._peer(lab, p, peer, uplink_ip)
                _routes_back(lab, p, wan, uplink_ip, lan_ns, (lan, lan6))
                leased()
                self._wait_up(lab, p, peers, vm, report.timings)
                self._wait_ipv6(lab, wan, p, vm, report.timings)
            expect = self._expectations(p, peers, uplink_ip, (lan, lan6), lab, wan, lan_ns, arrivals)
            self.live = LiveLab(lab, wan, p, peers, vm, uplink_ip, (lan, lan6), lan_ns, arrivals)
            with self.step("testinfra suite and traffic through the tunnel"):
                t0 = time.monotonic()
                self._suite(report, vm.ssh_port, expect)
                report.timings["suite"] = round(time.monotonic() - t0, 1)
        return report

    def _lan(self, lab: Lab, vm: VM, ns: str, tap: str, p: Profile, host: str, host6: str | None,
             arrivals: Path) -> None:
        _attach(lab, vm, ns, tap, "tapl")
        lan_if = p.interfaces.lan
        if lan_if is None or isinstance(lan_if.ipv4, str):
            raise LabError("the lab's LAN host needs a static IPv4 address on interfaces.lan")
        lab.run(ns, ["ip", "addr", "add", f"{host}/{lan_if.ipv4.address.network.prefixlen}", "dev", "tapl"])
        lab.run(ns, ["ip", "route", "add", "default", "via", str(lan_if.ipv4.address.ip)])
        if host6 and not isinstance(lan_if.ipv6, str):
            lab.run(ns, ["ip", "addr", "add", f"{host6}/{lan_if.ipv6.address.network.prefixlen}", "dev", "tapl",
                         "nodad"])
            lab.run(ns, ["ip", "-6", "route", "add", "default", "via", str(lan_if.ipv6.address.ip)])
        lab.run(ns, ["nft", "-f", "-"], input=protocol_counters("tapl"))
        lab.serve(ns, ",".join(map(str, PORTS)), arrivals, "lan-server")

    def _uplink(self, lab: Lab, wan: str, p: Profile, arrivals: Path, vm: VM) -> tuple[str, Callable[[], None]]:
        """The upstream side of the uplink: its server and, when the profile says DHCP, a DHCP server that
        reserves UPLINK_LEASE for the appliance. Returns the uplink's address, known at once, and what
        waits until the appliance has it."""
        uplink = p.interfaces.uplink
        if uplink is None:
            raise LabError("the lab boots appliances with an uplink (interfaces.uplink)")
        lab.serve(wan, ",".join(map(str, PORTS)), arrivals, "upstream-server")
        ra = _uplink_ipv6(lab, wan, uplink.ipv6)
        if ra and not isinstance(uplink.ipv4, str):
            lab.spawn(wan, ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=tapu",
                            "--bind-interfaces", *ra], "dnsmasq-ra")
        if isinstance(uplink.ipv4, str):
            lab.run(wan, ["ip", "addr", "add", f"{WAN_GATEWAY}/24", "dev", "tapu"])
            leases = lab.dir / "dnsmasq.leases"
            # --no-ping: no other host lives on this network, and dnsmasq's address-in-use check
            # would hold every first lease back by 3 s (PING_WAIT)
            # the lab's DNS server too (its address goes out with the lease): it knows LAB_NAME and logs
            # every query with its source
            dnsmasq = lab.spawn(wan, ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=53", "--no-resolv",
                                      "--no-hosts", f"--address=/{LAB_DOMAIN}/{WAN_GATEWAY}", "--log-queries",
                                      "--interface=tapu", "--bind-interfaces",
                                      "--dhcp-range=198.18.30.100,198.18.30.150,255.255.255.0,1h",
                                      f"--dhcp-host={UPLINK_MAC},{UPLINK_LEASE}",
                                      f"--dhcp-option=option:router,{WAN_GATEWAY}", f"--dhcp-leasefile={leases}",
                                      "--dhcp-authoritative", "--no-ping", *ra], "dnsmasq")

            def done() -> bool:  # or nothing more will come: the VM (a kernel panic) or dnsmasq ended
                return (dnsmasq.poll() is not None or not vm.running()
                        or _lease(leases, UPLINK_MAC) is not None)

            def leased() -> None:
                try:
                    wait_for(done, self.timeout, 0.2)
                except LabError as e:
                    raise LabError(f"{e}: the uplink asked for no DHCP lease"
                                         + self._diagnose(vm.ssh_port)) from None
                if not vm.running():
                    raise LabError(f"the VM stopped after {vm.seconds():.0f} s, before its uplink had an address")
                ip = _lease(leases, UPLINK_MAC)
                if dnsmasq.poll() is not None and ip is None:
                    raise LabError(f"the lab's DHCP server stopped: {lab.log('dnsmasq').strip()}")
                if ip != UPLINK_LEASE:
                    raise LabError(f"the uplink leased {ip}, not the address reserved for it ({UPLINK_LEASE})")

            return UPLINK_LEASE, leased
        gw = uplink.ipv4.gateway or next(h for h in uplink.ipv4.address.network.hosts() if h != uplink.ipv4.address.ip)
        lab.run(wan, ["ip", "addr", "add", f"{gw}/{uplink.ipv4.address.network.prefixlen}", "dev", "tapu"])
        if str(gw) != WAN_GATEWAY:  # the upstream server, beyond the gateway
            lab.run(wan, ["ip", "addr", "add", f"{WAN_GATEWAY}/32", "dev", "tapu"])
        return str(uplink.ipv4.address.ip), lambda: None

    def _peer(self, lab: Lab, p: Profile, peer: LabPeer, uplink_ip: str) -> None:
        keyfile = self.workdir / f"{peer.name}.key"
        keyfile.write_text(peer.private_key + "\n")
        store = SecretStore(self.workdir / "secrets")
        psk = store.preshared_key(p.name, peer.name) if any(
            x.name == peer.name and x.preshared_key for x in p.wireguard.peers) else None
        entry = next(x for x in p.wireguard.peers if x.name == peer.name)
        conf = client_config(p, entry, public_key(store.private_key(p.name)), psk, peer.private_key,
                             f"{uplink_ip}:{p.wireguard.listen_port}")
        peer.setconf = split_wg_quick(conf)[0]
        # a larger MTU than the appliance's tunnel: only MSS clamping keeps TCP segments fitting
        start_peer(lab, peer.ns, "wgp", conf, mtu=1500)
        lab.run(peer.ns, ["ip", "route", "add", f"{uplink_ip}/32", "via", _gateway(lab, peer.ns)])
        for net in routes_for_peer(p):
            if net.version == 4 or peer.tunnel_ip6:
                lab.run(peer.ns, ["ip", f"-{net.version}", "route", "replace", str(net), "dev", "wgp"])
        if not p.is_exit_node:  # a peer that sends more than it was offered: the appliance must refuse
            lab.run(peer.ns, ["ip", "route", "add", f"{WAN_GATEWAY}/32", "dev", "wgp"])
            if peer.tunnel_ip6:
                lab.run(peer.ns, ["ip", "-6", "route", "add", f"{WAN_GATEWAY6}/128", "dev", "wgp"])

    @contextmanager
    def _unsticking(self, vm: VM) -> Iterator[None]:
        """A VM that reboots (persistent_disk) is power-cycled when TCG hangs in a reboot
        (VM.unstick_reboots); the times it was are kept in self.resets."""
        if not self.persistent_disk:
            yield
            return
        stop = threading.Event()
        # a boot says nothing on the console until systemd starts (quiet): half the lab's limit is
        # ample for that under TCG
        silence = self.timeout / 2
        watcher = threading.Thread(target=lambda: self.resets.extend(vm.unstick_reboots(stop, silence=silence)),
                                   daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join(timeout=10)

    def follow(self, profile: Profile, new_peers: Sequence[LabPeer] = ()) -> dict[str, Any]:
        """After an update to `profile` (a lab variant: lab_variant's, with lab_peer's keys for peers
        it adds): each new peer gets its namespace in the running lab, and the suite's expectations
        become the new profile's. Returns them."""
        live = self.live
        if live is None:
            raise LabError("the lab is not running")
        peers = list(live.peers)
        for peer in new_peers:
            _peer_namespace(live.lab, live.wan, len(peers), peer)
            self._peer(live.lab, profile, peer, live.uplink_ip)
            peers.append(peer)
        _routes_back(live.lab, profile, live.wan, live.uplink_ip, live.lan_ns, live.lans)
        self.live = dataclasses.replace(live, profile=profile, peers=peers)
        self.lab_profile = profile
        return self._expectations(profile, peers, live.uplink_ip, live.lans, live.lab, live.wan, live.lan_ns,
                                  live.arrivals)

    def wait_up_again(self) -> None:
        """After the appliance rebooted (an update): the tunnel and the uplink's IPv6 as after its boot."""
        if self.live is None:
            raise LabError("the lab is not running")
        live, timings = self.live, {"boot_to_ssh": 0.0}
        # the peers' handshakes from before the reboot would count, and their sessions are stale (the
        # appliance forgot them): each starts afresh, and each must complete a handshake again
        for peer in live.peers:
            live.lab.run(peer.ns, ["wg", "setconf", "wgp", "/dev/stdin"], input=peer.setconf)
        self._wait_up(live.lab, live.profile, live.peers, live.vm, timings, every=True)
        self._wait_ipv6(live.lab, live.wan, live.profile, live.vm, timings)

    def _wait_up(self, lab: Lab, p: Profile, peers: list[LabPeer], vm: VM, timings: dict[str, float],
                 every: bool = False) -> None:
        """Until SSH answers and a peer has completed a handshake; each time is taken when it happens.
        A ping to the appliance's tunnel address gives the peers something to send. A WireGuard peer
        whose initiation went unanswered (the tunnel was not up yet) tries again only after 5 s
        (REKEY_TIMEOUT): each lab peer is set anew every REARM_S instead (which drops a handshake in
        flight, so not more often), the peers in turn, so the time is when the appliance first
        answers, to REARM_S / peers. The ping waits no longer than a poll: a handshake is what counts.
        every: until each peer has completed one (after a reboot, before the suite's traffic)."""
        target = str(p.wireguard.addresses[0].ip)
        clock = vm.seconds
        start = clock()
        rearmed = [start - REARM_S + i * REARM_S / len(peers) for i in range(len(peers))]

        done: set[int] = set()  # peers with a handshake (no longer set anew)

        def any_handshake() -> bool:
            for i, peer in enumerate(peers):
                if i in done:
                    continue
                if clock() - rearmed[i] >= REARM_S:
                    rearmed[i] = clock()
                    lab.run(peer.ns, ["wg", "setconf", "wgp", "/dev/stdin"], input=peer.setconf)
                    lab.run(peer.ns, ["ping", "-c", "1", "-W", "0.2", target], check=False)
                out = lab.run(peer.ns, ["wg", "show", "wgp", "latest-handshakes"], check=False).stdout
                if any(int(x.split()[-1]) > 0 for x in out.splitlines() if x.strip()):
                    done.add(i)
                    if not every:
                        return True
            return len(done) == len(peers)

        def both() -> bool:  # SSH is watched apart (_SshWatch)
            if not vm.running():
                raise LabError(f"the VM stopped after {clock():.0f} s")
            if "boot_to_handshake" not in timings and any_handshake():
                timings["boot_to_handshake"] = round(clock(), 1)
            return "boot_to_ssh" in timings and "boot_to_handshake" in timings

        try:
            wait_for(both, self.timeout, 0.2)
        except LabError as e:
            missing = [k for k in ("boot_to_ssh", "boot_to_handshake") if k not in timings]
            raise LabError(f"{e}: no {' and no '.join(m.removeprefix('boot_to_') for m in missing)}"
                                 + self._diagnose(vm.ssh_port)) from None

    def _wait_ipv6(self, lab: Lab, wan: str, p: Profile, vm: VM, timings: dict[str, float]) -> None:
        """Until the uplink's IPv6 address answers from the uplink's side: SLAAC waits for the lab's
        router advertisement and duplicate address detection, which may end after the tunnel is up;
        the suite's IPv6 cases need it. A static address is there at once."""
        address = uplink_ipv6(p)
        if address is None:
            return
        try:
            wait_for(lambda: lab.run(wan, ["ping", "-c", "1", "-W", "0.5", address], check=False).returncode == 0,
                     60, 0.2)
        except LabError as e:
            raise LabError(f"{e}: the uplink's IPv6 address {address} does not answer"
                           + self._diagnose(vm.ssh_port)) from None
        timings["boot_to_ipv6"] = round(vm.seconds(), 1)

    def _diagnose(self, ssh_port: int) -> str:
        """What the appliance says about itself, when SSH answers: failed units, jobs still waiting
        (a boot that hangs), the links and the dataplane's log."""
        if not _banner(ssh_port):
            return " (SSH does not answer: see the console log)"
        script = ("systemctl --failed --no-legend --plain; systemctl list-jobs --no-legend --plain; "
                  "networkctl list --no-legend --no-pager; "
                  "journalctl -b --no-pager -o short-monotonic -n 60 -u 'appliance-*' -u systemd-networkd "
                  "-u systemd-udevd -u systemd-udev-trigger")
        try:
            ssh = run(["ssh", "-F", self.workdir / "ssh_config", "-p", str(ssh_port), "-o", "BatchMode=yes",
                       "-o", "ConnectTimeout=10", "127.0.0.1", script], check=False, timeout=60)
        except CommandFailed as e:
            return f"\n(the appliance's own account of it did not come: {e})"
        return "\nthe appliance's failed units, waiting jobs, links and logs:\n" + str(ssh.stdout + ssh.stderr).strip()

    def _expectations(self, p: Profile, peers: list[LabPeer], uplink_ip: str, lans: tuple[str | None, str | None],
                      lab: Lab, wan: str, lan_ns: str | None, arrivals: Path) -> dict[str, Any]:
        spec = image_spec(p)
        dp = p.dataplane
        lan, lan6 = lans
        uplink6 = uplink_ipv6(p)
        uplink = p.interfaces.uplink
        if uplink is None:
            raise LabError("the lab boots appliances with an uplink (interfaces.uplink)")
        sources = {WAN_GATEWAY: uplink_ip, **({WAN_GATEWAY6: uplink6} if uplink6 else {}),
                   **({lan: _lan_ip(p)} if lan else {}), **({lan6: _lan_ip(p, 6)} if lan6 else {})}
        ids = DiskIds.for_name(p.name)
        return {
            "name": p.name, "roles": list(p.roles), "mode": dp.mode, "implementation": dp.wireguard,
            "disk": {"entries": [Path(uki_entry(p.name, tries=None)).name], "machine_id": ids.machine_id,
                     "root_partuuid": ids.slot_partition(Slot.A), "data_partuuid": ids.data_part},
            "units": sorted({*spec.enable_units, *spec.appliance_units}),
            "watchdog": spec.platform.vm_watchdog,
            "devices": lab_devices(hardware=not spec.vm, plat=spec.platform),
            "uplink_mac": UPLINK_MAC, "uplink_ip": uplink_ip, "uplink_ip6": uplink6 or "",
            "offload": {"rx-udp-gro-forwarding": uplink.offload.udp_gro_forwarding,
                        "rx-gro-list": uplink.offload.gro_list},
            "table": p.routing.table, "rule_priority": p.routing.rule_priority,
            "routes": sorted(str(n) for peer in p.wireguard.peers for n in peer.allowed_ips if n.version == 4),
            "peer_keys": sorted(x.public_key for x in p.wireguard.peers),
            "tunnel_address": str(p.wireguard.addresses[0].ip), "shields_up": p.firewall.shields_up,
            "mss_clamp": p.routing.mss_clamp, "wg_mtu": p.wireguard.mtu,
            "lab": {"dir": str(lab.dir), "wan": wan, "lan": lan_ns, "arrivals": str(arrivals), "probe": probe.__file__,
                    "peers": {x.name: {"ns": x.ns, "tunnel_ip": x.tunnel_ip} for x in peers},
                    "far_end": {"upstream": wan, "not advertised": wan, "lan host": lan_ns}},
            "masquerade": sorted(p.masquerade_families) if p.kernel_mode else [],
            # the appliance's upstream resolver is the lab's when its uplink takes DHCP and no
            # upstreams are named: then a peer's query must reach the lab's server through it
            "metrics": {"listen_on": list(p.metrics.listen_on), "port": p.metrics.port,
                        "lan_address": _lan_ip(p) if "lan" in p.metrics.listen_on else ""},
            "dns": {"serve": p.dns.serve, "check": isinstance(uplink.ipv4, str) and not p.dns.upstreams,
                    "name": f"www.{LAB_DOMAIN}", "answer": WAN_GATEWAY},
            "cases": [c.to_json() for c in traffic_cases(p, peers, lan, sources, lan6)],
        }

    def _suite(self, report: BootReport, port: int, expect: dict[str, Any]) -> None:
        (self.workdir / "expect.json").write_text(json.dumps(expect, indent=1))
        result = run_suite(SUITE, self.workdir / "suite", f"paramiko://root@127.0.0.1:{port}",
                           env={"APPLIANCE_BOOT_EXPECT": str(self.workdir / "expect.json")},
                           args=(f"--ssh-config={self.workdir / 'ssh_config'}",))
        report.output, report.passed, report.failed = result.output, result.passed, result.failed
        report.failures = result.failures


def _peer_namespace(lab: Lab, wan: str, i: int, peer: LabPeer) -> None:
    """Peer i's namespace, behind the wan namespace (which routes between peers and the uplink)."""
    peer.ns = lab.ns(f"p{i}")
    lab.veth((wan, f"w{i}", f"198.18.{40 + i}.1/24"), (peer.ns, "p0", f"198.18.{40 + i}.2/24"))
    lab.run(peer.ns, ["ip", "route", "add", "default", "via", f"198.18.{40 + i}.1"])


def _routes_back(lab: Lab, p: Profile, wan: str, uplink_ip: str, lan_ns: str | None,
                 lans: tuple[str | None, str | None]) -> None:
    """Without SNAT (or NAT66) the far end sees peers' own tunnel addresses: its network routes them
    back via the appliance (README, "Routing without SNAT"), here each lab host that replies."""
    lan, lan6 = lans
    for version, up, down in ((4, uplink_ip, _lan_ip(p) if lan_ns and lan else None),
                              (6, uplink_ipv6(p), _lan_ip(p, 6) if lan_ns and lan6 else None)):
        if masquerades(p, version):
            continue
        nets = sorted({str(n) for peer in p.wireguard.peers for n in peer.allowed_ips if n.version == version})
        for ns, via in ((wan, up), (lan_ns, down)):
            if ns and via:
                for net in nets:
                    lab.run(ns, ["ip", f"-{version}", "route", "replace", net, "via", via])


def _attach(lab: Lab, vm: VM, ns: str, tap: str, name: str) -> None:
    """Move a TAP QEMU holds into a lab namespace, under a stable name (noted for a power cycle)."""
    run(["ip", "link", "set", tap, "netns", ns, "name", name], error=LabCommandFailed)
    vm.moved[tap] = (ns, name)
    lab.run(ns, ["ip", "link", "set", name, "up"])


def _uplink_ipv6(lab: Lab, wan: str, ipv6: str | StaticIPv6) -> list[str]:
    """IPv6 on the uplink's side as the profile has it: the lab's router (addresses, and for "ra" the
    dnsmasq options that advertise the prefix for SLAAC and the router as the default route)."""
    if ipv6 == "ra":
        lab.run(wan, ["ip", "addr", "add", f"{WAN_GATEWAY6}/64", "dev", "tapu", "nodad"])
        return ["--enable-ra", f"--dhcp-range={WAN_PREFIX6.split('/')[0]},ra-only,64,1h", "--ra-param=tapu,10,1800"]
    if not isinstance(ipv6, str):  # the gateway, and the upstream server beyond it
        gw6 = str(ipv6.gateway or WAN_GATEWAY6)
        lab.run(wan, ["ip", "addr", "add", f"{gw6}/{ipv6.address.network.prefixlen}", "dev", "tapu", "nodad"])
        if gw6 != WAN_GATEWAY6:
            lab.run(wan, ["ip", "addr", "add", f"{WAN_GATEWAY6}/128", "dev", "tapu", "nodad"])
    return []


def _gateway(lab: Lab, ns: str) -> str:
    out = lab.run(ns, ["ip", "-j", "route", "show", "default"]).stdout
    return str(json.loads(out)[0]["gateway"])


def _lan_ip(p: Profile, version: int = 4) -> str:
    lan = p.interfaces.lan
    cfg = None if lan is None else lan.ipv4 if version == 4 else lan.ipv6
    if cfg is None or isinstance(cfg, str):
        raise LabError(f"the lab's LAN host needs a static IPv{version} address on interfaces.lan")
    return str(cfg.address.ip)
