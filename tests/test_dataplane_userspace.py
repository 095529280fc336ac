"""Userspace (rootless) dataplane in network namespaces: peer <-> host <-> upstream.

The "host" namespace stands for the appliance; the dataplane runs there as an unprivileged uid with
no passwd entry, exactly as `appliance-dataplane userspace` runs in the image (minus systemd). It
gets a TUN node it owns in a private mount namespace: the image's udev makes /dev/net/tun 0666, this
test host's is 0600 root. Packets are checked where they arrive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.verify import dplab, probe
from appliance.verify.dplab import SERVER, UID, DataplaneLab
from appliance.verify.netns import protocol_counters
from conftest import require_tool

pytestmark = pytest.mark.root

PROBE = str(Path(probe.__file__))


class Rootless:
    def __init__(self, d: DataplaneLab):
        self.lab, self.dataplane = d.lab, d.dataplane
        self.peer, self.host, self.up = d.client, d.appliance, d.server

    def ping(self) -> bool:
        return self.lab.run(self.peer, ["ping", "-c", "1", "-W", "2", SERVER], check=False).returncode == 0


@pytest.fixture(scope="module")
def rootless() -> Iterator[Rootless]:
    for tool in ("wireguard-go", "pasta", "microsocks", "nft", "setpriv", "unshare"):
        require_tool(tool)
    if subprocess.run(["/usr/bin/python3", "-c", "import pyroute2"], capture_output=True).returncode:
        pytest.fail("Debian's python3-pyroute2 is not installed: run `make setup`")
    d = dplab.start("userspace", tag="u")
    try:
        t = Rootless(d)
        # no kernel forwarding on the host: everything crosses pasta
        assert d.lab.run(d.appliance, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
        d.lab.run(d.server, ["nft", "-f", "-"], input=protocol_counters("s0", echo_from="198.18.60.1"))
        d.lab.spawn(d.server, [sys.executable, PROBE, "serve", "7000", d.lab.dir / "arrivals.jsonl"], "upstream")
        time.sleep(0.3)
        yield t
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


def test_other_protocols_do_not_pass(rootless: Rootless) -> None:
    lab = rootless.lab
    for proto in ("132", "47"):
        lab.run(rootless.peer, [sys.executable, PROBE, "raw", SERVER, proto, "5"])
    time.sleep(0.5)
    counters = lab.run(rootless.up, ["nft", "list", "table", "inet", "count"]).stdout
    assert "sctp counter packets 0 " in counters and "gre counter packets 0 " in counters, counters


def test_no_dataplane_process_is_privileged_on_the_host(rootless: Rootless) -> None:
    """Every process of the dataplane runs as the unprivileged uid; any capabilities they hold are in
    their own user namespace, not the host's."""
    assert rootless.dataplane is not None
    host_userns = os.readlink("/proc/self/ns/user")  # this test runs as root in the host namespaces
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
        cap_eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
        if uid == UID:
            procs.append((comm, cap_eff, userns))
    names = {comm for comm, _, _ in procs}
    assert {"wireguard-go", "microsocks", "redsocks"} <= names and any(n.startswith("pas") for n in names), names
    for comm, cap_eff, userns in procs:
        assert cap_eff == 0 or userns != host_userns, f"{comm} holds capabilities in the host's user namespace"
    assert any(userns == host_userns for _, _, userns in procs), "the outer process should be on the host"


def test_socks5_reaches_the_tunnel(rootless: Rootless) -> None:
    """A local program on the host reaches a peer's service through the SOCKS5 proxy."""
    lab = rootless.lab
    lab.spawn(rootless.peer, [sys.executable, PROBE, "serve", "7100", lab.dir / "peer-arrivals.jsonl"], "peer-server")
    time.sleep(0.5)
    lab.run(rootless.host, [sys.executable, PROBE, "socks", "127.0.0.1:1080", "100.64.9.2", "7100"])
    arrivals = (lab.dir / "peer-arrivals.jsonl").read_text()
    assert '"src": "100.64.9.1"' in arrivals  # it came out of the tunnel, from the appliance's tunnel address


def _namespace_pid(rootless: Rootless) -> str:
    log = rootless.lab.log("dataplane")
    return log.split("wireguard-go in namespace ", 1)[1].split(",", 1)[0]


def test_peers_bulk_tcp_goes_through_the_relay(rootless: Rootless) -> None:
    """A peer's upload carries on without stalls: it ends in the namespace's kernel (relay chain
    counts it) rather than in pasta's TCP, which stalled such uploads at ~0.005 Gbit/s."""
    lab = rootless.lab
    lab.spawn(rootless.up, ["iperf3", "-s", "-1", "-p", "5301"], "iperf-relay")
    time.sleep(0.5)
    t0 = time.monotonic()
    out = lab.run(rootless.peer, ["iperf3", "-c", SERVER, "-p", "5301", "-n", "32M", "-J"], timeout=120).stdout
    seconds = time.monotonic() - t0
    end = json.loads(out)["end"]
    assert end["sum_sent"]["bytes"] >= 32 * 2**20, end["sum_sent"]
    assert end["sum_received"]["bytes"] >= 24 * 2**20, end["sum_received"]  # its last interval may be cut short
    # 32 MiB in 20 s is 13 Mbit/s: well below what the relay does here (~250), well above the stall
    assert seconds < 20, f"32 MiB took {seconds:.1f} s"
    ns = ["nsenter", "-t", _namespace_pid(rootless), "-n", "nft", "list", "chain", "inet", "appliance", "relay_allowed"]
    relayed = subprocess.run(ns, capture_output=True, text=True, check=True).stdout
    v4 = next(line for line in relayed.splitlines() if "nfproto ipv4" in line and "redirect" in line)
    assert "counter packets 0 " not in v4, relayed

