"""Userspace (rootless) dataplane in network namespaces: peer <-> host <-> upstream.

The "host" namespace stands for the appliance; the dataplane runs there as an unprivileged uid with
no passwd entry and no capabilities, exactly as `appliance-dataplane userspace` runs in the image
(minus systemd), with the appliance-netstack binary the image build compiles. Packets are checked
where they arrive."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.verify import dplab, probe
from appliance.verify.dplab import APPLIANCE_UPLINK6, SERVER, SERVER6, UID, DataplaneLab
from appliance.verify.netns import protocol_counters, wait_for
from conftest import require_tool

pytestmark = pytest.mark.root

PROBE = str(Path(probe.__file__))
TUNNEL_ADDRESS = "100.64.9.1"  # the appliance's, in dplab's profile
UPLINK_ADDRESS = "198.18.60.1"  # the appliance's other address, on the uplink (the peer reaches it by the tunnel)
TUNNEL_ADDRESS6 = "fd7a:115c:a1e0:9::1"
PEER6 = "fd7a:115c:a1e0:9::2"
SERVICE = 7200  # the labs' SSH port: the one service the appliance offers peers
PRIVATE_HOST = "192.168.77.2"  # upstream, on a private network


class Rootless:
    def __init__(self, d: DataplaneLab):
        self.lab, self.dataplane, self.restart = d.lab, d.dataplane, d.restart
        self.peer, self.host, self.up = d.client, d.appliance, d.server

    def ping(self, target: str = SERVER) -> bool:
        return self.lab.run(self.peer, ["ping", "-c", "1", "-W", "2", target], check=False).returncode == 0

    def connects(self, host: str, port: int) -> bool:
        return self.lab.run(self.peer, [sys.executable, PROBE, "connect", host, str(port)],
                            check=False).returncode == 0


def _start(tag: str, extra: str = "", socks5: str = "127.0.0.1:1080") -> DataplaneLab:
    for tool in ("wireguard-go", "nft", "setpriv", "iperf3"):
        require_tool(tool)
    d = dplab.start("userspace", tag=tag, extra=extra, socks5=socks5, ssh_port=SERVICE)
    try:
        # no kernel forwarding on the host: every packet of a peer ends in the userspace stack
        assert d.lab.run(d.appliance, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
        d.lab.run(d.server, ["nft", "-f", "-"], input=protocol_counters("s0", echo_from="198.18.60.1",
                                                                      echo6_from=APPLIANCE_UPLINK6))
        # a host on a private network, as the uplink's LAN or a cloud's metadata service would be
        d.lab.run(d.server, ["ip", "addr", "add", f"{PRIVATE_HOST}/32", "dev", "s0"])
        d.lab.serve(d.server, "7000,7001", d.lab.dir / "arrivals.jsonl", "upstream")
        return d
    except BaseException:
        d.close()
        raise


@pytest.fixture(scope="module")
def rootless() -> Iterator[Rootless]:
    d = _start("u")
    try:
        yield Rootless(d)
    finally:
        d.close()


def test_tcp_udp_ping_reoriginated_from_the_host(rootless: Rootless) -> None:
    lab = rootless.lab
    lab.run(rootless.peer, [sys.executable, PROBE, "tcp", SERVER, "7000"])
    lab.run(rootless.peer, [sys.executable, PROBE, "udp", SERVER, "7000"])
    assert rootless.ping()
    counters = lab.run(rootless.up, ["nft", "list", "table", "inet", "count"]).stdout
    assert "saddr 198.18.60.1 counter packets 0 " not in counters, "the echo request never reached upstream"
    seen = {(a["proto"], a["src"]) for a in rootless.lab.arrivals()}
    assert {("tcp", "198.18.60.1"), ("udp", "198.18.60.1")} <= seen, seen
    assert not any(str(a["src"]).startswith("100.64.") for a in rootless.lab.arrivals())


def test_ipv6_tcp_udp_ping_reoriginated_from_the_host(rootless: Rootless) -> None:
    """IPv6 through the netstack: a peer's flows from its ULA tunnel address leave from the host's
    own IPv6 address (what NAT66 gives in kernel mode), ping included."""
    lab = rootless.lab
    before = len(lab.arrivals())
    lab.run(rootless.peer, [sys.executable, PROBE, "tcp", SERVER6, "7000"])
    lab.run(rootless.peer, [sys.executable, PROBE, "udp", SERVER6, "7000"])
    assert rootless.ping(SERVER6)
    counters = lab.run(rootless.up, ["nft", "list", "table", "inet", "count"]).stdout
    assert f"saddr {APPLIANCE_UPLINK6} icmpv6 type echo-request counter packets 0 " not in counters, counters
    seen = {(a["proto"], a["src"]) for a in lab.arrivals()[before:]}
    assert seen == {("tcp", APPLIANCE_UPLINK6), ("udp", APPLIANCE_UPLINK6)}, seen


def test_ping_of_a_host_that_is_down_gets_no_answer(rootless: Rootless) -> None:
    """The echo reply comes from the real target, not from the appliance: the same ping is answered
    for a host that is up, and not for one that is down, in both families."""
    assert rootless.ping(SERVER) and rootless.ping(SERVER6)
    assert not rootless.ping("198.18.60.77")
    assert not rootless.ping("2001:db8:60::77")


def test_other_protocols_do_not_pass(rootless: Rootless) -> None:
    lab = rootless.lab
    for proto in ("132", "47"):
        lab.run(rootless.peer, [sys.executable, PROBE, "raw", SERVER, proto, "5"])
    time.sleep(0.5)  # a window for what must not arrive
    counters = lab.run(rootless.up, ["nft", "list", "table", "inet", "count"]).stdout
    assert "sctp counter packets 0 " in counters and "gre counter packets 0 " in counters, counters


def test_no_dataplane_process_is_privileged(rootless: Rootless) -> None:
    """The dataplane is the launcher and appliance-netstack, both the unprivileged uid without any
    capability, in the host's own namespaces; there is no TUN device."""
    assert rootless.dataplane is not None
    procs = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            userns = os.readlink(f"/proc/{pid}/ns/user")
        except OSError:
            continue
        uid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))
        caps = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines()
                if line.startswith(("CapEff", "CapPrm", "CapAmb"))}
        if uid == UID:
            procs.append((comm, caps, userns))
    assert {comm for comm, _, _ in procs} == {"python3", "appliance-netst"}, procs
    for comm, caps, userns in procs:
        assert not any(caps.values()), f"{comm} holds capabilities: {caps}"
        assert userns == os.readlink("/proc/self/ns/user"), f"{comm} runs in a user namespace of its own"
    links = rootless.lab.run(rootless.host, ["ip", "-o", "link"]).stdout
    assert "wg0" not in links and "tun" not in links, links


def test_socks5_reaches_the_tunnel(rootless: Rootless) -> None:
    """A local program on the host reaches a peer's service through the SOCKS5 proxy."""
    lab = rootless.lab
    lab.serve(rootless.peer, "7100", lab.dir / "peer-arrivals.jsonl", "peer-server")
    lab.run(rootless.host, [sys.executable, PROBE, "socks", "127.0.0.1:1080", "100.64.9.2", "7100"])
    lab.run(rootless.host, [sys.executable, PROBE, "socks", "127.0.0.1:1080", PEER6, "7100"])
    # out of the tunnel, from the appliance's tunnel address of each family
    seen = {a["src"] for a in lab.arrivals("peer-arrivals.jsonl")}
    assert seen == {"100.64.9.1", TUNNEL_ADDRESS6}, seen


def test_peers_reach_the_appliances_own_services(rootless: Rootless) -> None:
    """Shields down: the appliance's addresses stand for the appliance itself, as in kernel mode:
    peers reach the service the profile offers them (SSH) there, on its tunnel address and on its
    others."""
    lab = rootless.lab
    lab.serve(rootless.host, str(SERVICE), lab.dir / "host-arrivals.jsonl", "host-server")
    for address in (TUNNEL_ADDRESS, UPLINK_ADDRESS, TUNNEL_ADDRESS6, APPLIANCE_UPLINK6):
        lab.run(rootless.peer, [sys.executable, PROBE, "tcp", address, str(SERVICE)])
    assert (lab.dir / "host-arrivals.jsonl").read_text().count('"proto": "tcp"') == 4
    assert rootless.ping(UPLINK_ADDRESS) and rootless.ping(TUNNEL_ADDRESS)
    assert rootless.ping(APPLIANCE_UPLINK6) and rootless.ping(TUNNEL_ADDRESS6)


def test_peers_reach_no_other_service_of_the_appliance(rootless: Rootless) -> None:
    """Nothing but the offered service: not a loopback-only service, not another port of a service
    that listens everywhere, and not the SOCKS5 proxy (the way to get around the ACL)."""
    lab = rootless.lab
    log = lab.dir / "loopback-arrivals.jsonl"
    lab.serve(rootless.host, "7300", log, "loopback-server", bind="127.0.0.1")
    lab.serve(rootless.host, "7300", log, "loopback6-server", bind="::1")
    lab.serve(rootless.host, "7301", log, "other-server")
    for address in (TUNNEL_ADDRESS, UPLINK_ADDRESS, TUNNEL_ADDRESS6, APPLIANCE_UPLINK6):
        for port in (7300, 7301, 1080):
            assert not rootless.connects(address, port), f"a peer reached {address}:{port}"
    assert not log.exists() or not log.read_text()
    # control: the services are up, and reached from the appliance itself
    lab.run(rootless.host, [sys.executable, PROBE, "tcp", "127.0.0.1", "7300"])
    lab.run(rootless.host, [sys.executable, PROBE, "tcp", "127.0.0.1", "7301"])
    lab.run(rootless.host, [sys.executable, PROBE, "tcp", "::1", "7300"])
    assert log.read_text().count('"proto": "tcp"') == 3


def test_socks5_leads_into_the_tunnel_only(rootless: Rootless) -> None:
    """The proxy lets local programs reach peers, and nothing else: not upstream hosts, not the
    appliance's own loopback services (test_socks5_reaches_the_tunnel is the control)."""
    lab = rootless.lab
    before = len(lab.arrivals())
    for host, port in ((SERVER, 7000), ("127.0.0.1", SERVICE), (TUNNEL_ADDRESS, SERVICE), (SERVER6, 7000),
                       ("::1", SERVICE), (TUNNEL_ADDRESS6, SERVICE)):
        refused = lab.run(rootless.host, [sys.executable, PROBE, "socks", "127.0.0.1:1080", host, str(port)],
                          check=False)
        assert refused.returncode != 0, f"the proxy reached {host}:{port}"
    assert len(lab.arrivals()) == before


def test_bulk_upload(rootless: Rootless) -> None:
    """A peer's upload carries on without stalls (pasta's TCP path, the earlier design, ran such
    uploads at ~0.005 Gbit/s)."""
    lab = rootless.lab
    lab.spawn(rootless.up, ["iperf3", "-s", "-1", "-p", "5301", "--forceflush"], "iperf-bulk")
    wait_for(lambda: "listening" in lab.log("iperf-bulk"), 10, 0.05)
    t0 = time.monotonic()
    out = lab.run(rootless.peer, ["iperf3", "-c", SERVER, "-p", "5301", "-n", "32M", "-J"], timeout=120).stdout
    seconds = time.monotonic() - t0
    end = json.loads(out)["end"]
    assert end["sum_sent"]["bytes"] >= 32 * 2**20, end["sum_sent"]
    assert end["sum_received"]["bytes"] >= 24 * 2**20, end["sum_received"]  # its last interval may be cut short
    # 32 MiB in 20 s is 13 Mbit/s: far below what it does here (~2000), far above a stall
    assert seconds < 20, f"32 MiB took {seconds:.1f} s"


def test_netstack_exit_ends_the_dataplane_and_a_restart_brings_traffic_back(rootless: Rootless) -> None:
    """If appliance-netstack dies, the dataplane exits non-zero (a lingering launcher would keep a
    dead tunnel "active") and systemd (Restart=always) starts it afresh: the peer's traffic comes
    back at once. Runs last among the lab's tests."""
    # the dataplane reads peers' endpoints back every 5 s, to remember them
    wait_for(lambda: (rootless.lab.dir / "dp/state/endpoints.json").exists(), 15, 0.2)
    proc, restart = rootless.dataplane, rootless.restart
    assert proc is not None and restart is not None
    child = next(pid for pid in os.listdir("/proc") if pid.isdigit() and _comm(pid) == "appliance-netst"
                 and _ppid(pid) == proc.pid)
    os.kill(int(child), signal.SIGKILL)
    assert proc.wait(timeout=10) == 1
    assert "appliance-netstack exited" in rootless.lab.log("dataplane")
    assert not rootless.ping()
    t0 = time.monotonic()
    rootless.dataplane = restart("dataplane-restarted")
    # the peer's session died with the process; the dataplane remembered where the peer was and
    # starts the handshake itself (waiting for the peer to notice takes ~15 s: WireGuard's keepalive
    # and rekey timeouts)
    wait_for(lambda: rootless.ping(), 8, 0.2)
    print(f"traffic back {time.monotonic() - t0:.1f} s after the restart")


def _comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


ACL = """\
firewall:
  shields_up: true
  acl:
    - {peers: [client], to: ["198.18.60.2/32:7000"], proto: tcp}
dns: {serve: false}
"""


@pytest.fixture(scope="module")
def guarded() -> Iterator[Rootless]:
    d = _start("g", ACL)
    try:
        yield Rootless(d)
    finally:
        d.close()


def test_acl_and_shields_up(guarded: Rootless) -> None:
    """Only what the ACL allows leaves the appliance; with shields up, peers cannot open connections
    to the appliance itself."""
    wait_for(lambda: guarded.connects(SERVER, 7000), 30, 0.5)
    assert not guarded.connects(SERVER, 7001)  # a port the ACL does not name
    guarded.lab.run(guarded.peer, [sys.executable, PROBE, "udp", SERVER, "7000"], check=False)
    assert not guarded.ping()  # no ICMP rule
    guarded.lab.serve(guarded.host, "7200", guarded.lab.dir / "host.jsonl", "hs")
    assert not guarded.connects(TUNNEL_ADDRESS, 7200)
    arrivals = guarded.lab.arrivals()
    assert {(a["proto"], a["port"]) for a in arrivals} == {("tcp", 7000)}, arrivals
    assert not (guarded.lab.dir / "host.jsonl").exists() or not (guarded.lab.dir / "host.jsonl").read_text()


@pytest.fixture(scope="module")
def shielded() -> Iterator[Rootless]:
    """Shields up and no ACL: peers reach everything off the appliance (but local networks), nothing
    on it."""
    d = _start("s", "firewall: {shields_up: true, block_local_networks: true}\n")
    try:
        yield Rootless(d)
    finally:
        d.close()


def test_local_networks_are_left_out_of_the_way_to_everywhere(rootless: Rootless, shielded: Rootless) -> None:
    """firewall.block_local_networks: an exit node's peers reach the internet, not private networks
    off the appliance (the uplink's LAN, 169.254.169.254). Without it they do (the control)."""
    wait_for(lambda: shielded.connects(SERVER, 7000), 30, 0.5)
    assert not shielded.connects(PRIVATE_HOST, 7000)
    assert rootless.connects(PRIVATE_HOST, 7000)


def test_shields_up_covers_every_address_of_the_appliance(shielded: Rootless) -> None:
    """Shields up keeps peers off the appliance by any of its addresses (the LAN's or the uplink's
    as well as the tunnel's), as kernel mode's input chain does; forwarding still works."""
    lab = shielded.lab
    wait_for(lambda: shielded.connects(SERVER, 7000), 30, 0.5)  # control: the way through is open
    assert shielded.ping(SERVER)
    lab.serve(shielded.host, str(SERVICE), lab.dir / "host.jsonl", "hs")
    assert shielded.connects(SERVER6, 7000) and shielded.ping(SERVER6)
    for address in (TUNNEL_ADDRESS, UPLINK_ADDRESS, TUNNEL_ADDRESS6, APPLIANCE_UPLINK6):
        assert not shielded.connects(address, SERVICE), f"a peer reached the appliance at {address}"
        assert not shielded.ping(address), f"the appliance answered a peer's ping at {address}"
    assert not (lab.dir / "host.jsonl").exists() or not (lab.dir / "host.jsonl").read_text()


@pytest.fixture(scope="module")
def lan_proxy() -> Iterator[Rootless]:
    """The SOCKS5 proxy on the appliance's uplink address (a static one), with a password."""
    d = _start("p", socks5=f"{UPLINK_ADDRESS}:1080")
    try:
        yield Rootless(d)
    finally:
        d.close()


def test_a_proxy_beyond_loopback_takes_a_password_and_leads_only_into_the_tunnel(lan_proxy: Rootless) -> None:
    lab = lan_proxy.lab
    password = (lab.dir / "secrets/dplab/socks5.password").read_text().strip()
    assert len(password) >= 24
    lab.serve(lan_proxy.peer, "7100", lab.dir / "peer.jsonl", "peer-server")

    def via_proxy(host: str, port: int, credentials: str = "") -> bool:
        args = [sys.executable, PROBE, "socks", f"{UPLINK_ADDRESS}:1080", host, str(port)]
        return lab.run(lan_proxy.up, args + ([credentials] if credentials else []), check=False).returncode == 0

    # a host on the uplink's network: with the password into the tunnel, to a peer
    assert via_proxy("100.64.9.2", 7100, f"appliance:{password}")
    assert '"src": "100.64.9.1"' in (lab.dir / "peer.jsonl").read_text()
    assert not via_proxy("100.64.9.2", 7100)  # no authentication: refused
    assert not via_proxy("100.64.9.2", 7100, "appliance:wrong-password")
    # with the password, still nowhere but the tunnel: not the LAN, not the appliance's loopback
    assert not via_proxy(SERVER, 7000, f"appliance:{password}")
    assert not via_proxy("127.0.0.1", SERVICE, f"appliance:{password}")
    # and not a way in for peers: the proxy's port is not a service offered to them
    assert not lan_proxy.connects(UPLINK_ADDRESS, 1080) and not lan_proxy.connects(TUNNEL_ADDRESS, 1080)


def test_peers_reach_the_resolver_with_shields_up(shielded: Rootless, guarded: Rootless) -> None:
    """DNS is a service the profile offers peers (dns.serve, the default): the netstack relays the
    tunnel address's port 53 to resolved's stub on 127.0.0.53, with shields up too. A stand-in
    answers there (an echo server); a profile that serves no DNS (the guarded lab) relays nothing."""
    for lab in (shielded, guarded):
        lab.lab.serve(lab.host, "53", lab.lab.dir / "dns.jsonl", "stub", bind="127.0.0.53")
    for proto in ("udp", "tcp"):
        ok = shielded.lab.run(shielded.peer, [sys.executable, PROBE, proto, TUNNEL_ADDRESS, "53"], check=False)
        assert ok.returncode == 0, ok.stderr
        refused = guarded.lab.run(guarded.peer, [sys.executable, PROBE, proto, TUNNEL_ADDRESS, "53", "2"],
                                  check=False)
        assert refused.returncode != 0
    arrived = {(a["proto"], a["src"]) for a in shielded.lab.arrivals("dns.jsonl")}
    assert arrived == {("udp", "127.0.0.1"), ("tcp", "127.0.0.1")}, arrived
    assert not guarded.lab.arrivals("dns.jsonl")
