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

from appliance.profile import load_profile
from appliance.render import render
from appliance.secrets import SecretStore, generate_private_key, public_key
from appliance.verify import probe
from appliance.verify.netns import Lab, wait_for
from conftest import REPO, require_tool

pytestmark = pytest.mark.root

UID = 64123
PROBE = str(Path(probe.__file__))
PROFILE = """\
name: lab-rootless
roles: [exit-node]
interfaces:
  uplink: {{match: {{name: "h1"}}, ipv4: {{address: 198.18.60.1/24, gateway: 198.18.60.2}}}}
wireguard:
  addresses: [100.64.2.1/32]
  peers:
    - {{name: laptop, public_key: "{laptop}", allowed_ips: [100.64.2.2/32]}}
dataplane: {{mode: userspace, socks5: "127.0.0.1:1080"}}
"""
COUNTERS = """table inet count {
    chain pre {
        type filter hook prerouting priority -300; policy accept;
        iifname "u0" meta l4proto sctp counter
        iifname "u0" meta l4proto gre counter
        iifname "u0" icmp type echo-request ip saddr 198.18.60.1 counter
    }
}
"""


class Rootless:
    def __init__(self, lab: Lab):
        self.lab = lab
        self.peer, self.host, self.up = (f"{lab.prefix}-{n}" for n in ("peer", "host", "up"))
        self.dataplane: subprocess.Popen[bytes] | None = None

    def arrivals(self) -> list[dict[str, object]]:
        log = self.lab.dir / "arrivals.jsonl"
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    def ping(self) -> bool:
        return self.lab.run(self.peer, ["ping", "-c", "1", "-W", "2", "198.18.60.2"], check=False).returncode == 0


@pytest.fixture(scope="module")
def rootless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rootless]:
    for tool in ("wireguard-go", "pasta", "microsocks", "nft", "setpriv", "unshare"):
        require_tool(tool)
    if subprocess.run(["/usr/bin/python3", "-c", "import pyroute2"], capture_output=True).returncode:
        pytest.fail("Debian's python3-pyroute2 is not installed: run `make setup`")
    work = tmp_path_factory.mktemp("us")
    laptop_key = generate_private_key()
    profile = work / "p.yaml"
    profile.write_text(PROFILE.format(laptop=public_key(laptop_key)))
    p = load_profile(profile).profile
    tree = render(p, SecretStore(work / "secrets").appliance_keys(p.name, []))
    root = work / "root"
    tree.write(root, include_secrets=True)

    lab = Lab("u")
    t = Rootless(lab)
    try:
        peer, host, up = lab.ns("peer"), lab.ns("host"), lab.ns("up")
        lab.veth((peer, "p0", "198.18.50.2/24"), (host, "h0", "198.18.50.1/24"))
        lab.veth((host, "h1", "198.18.60.1/24"), (up, "u0", "198.18.60.2/24"))
        lab.run(host, ["ip", "route", "add", "default", "via", "198.18.60.2"])
        # what the image's sysctl.d sets; and no kernel forwarding on the host
        lab.run(host, ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])
        assert lab.run(host, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "0"
        lab.run(up, ["nft", "-f", "-"], input=COUNTERS)
        lab.spawn(up, [sys.executable, PROBE, "serve", "7000", lab.dir / "arrivals.jsonl"], "upstream")
        # the unprivileged dataplane: its config, key (as LoadCredential= would give it), TUN node
        private = lab.dir / "dp"
        private.mkdir()
        dp = json.loads((root / "etc/appliance/dataplane.json").read_text())
        dp["sysctl"] = {}
        (private / "dataplane.json").write_text(json.dumps(dp))
        creds = private / "credentials"
        creds.mkdir()
        (creds / "wireguard-private-key").write_bytes(
            (root / dp["wireguard"]["private_key_file"].lstrip("/")).read_bytes())
        (private / "rules.nft").write_bytes((root / "etc/appliance/userspace-nftables.conf").read_bytes())
        subprocess.run(["mknod", str(private / "tun"), "c", "10", "200"], check=True)
        for d in (lab.dir, lab.dir / "run"):  # traversable (not listable) for the unprivileged uid
            os.chmod(d, 0o711)
        for path in [private, *private.rglob("*"), lab.rundir(host), lab.rundir(host) / "wireguard"]:
            os.chown(path, UID, UID)
        os.chmod(private / "tun", 0o600)
        t.dataplane = lab.spawn(
            host, ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--inh-caps=-all", "--",
                   # Debian's python3 with python3-pyroute2, as in the image (the venv is under /root)
                   "env", f"CREDENTIALS_DIRECTORY={creds}", f"PYTHONPATH={REPO}", "/usr/bin/python3", "-m",
                   "appliance.dataplane", "--config", private / "dataplane.json", "userspace",
                   "--ruleset", private / "rules.nft"],
            "dataplane", binds=[(private / "tun", "/dev/net/tun")])
        wait_for(lambda: "userspace dataplane up" in lab.log("dataplane") or t.dataplane.poll() is not None, 30)
        assert t.dataplane.poll() is None, lab.log("dataplane")
        # the peer, from `appliance peer` output
        (work / "laptop.key").write_text(laptop_key)
        conf = subprocess.run([sys.executable, "-m", "appliance", "peer", str(profile), "laptop", "--endpoint",
                               "198.18.50.1:51820", "--private-key-file", str(work / "laptop.key"), "--secrets",
                               str(work / "secrets")], capture_output=True, text=True, check=True, cwd=REPO).stdout
        (work / "wgp.conf").write_text(conf)
        (work / "wgp.conf").chmod(0o600)
        stripped = subprocess.run(["wg-quick", "strip", str(work / "wgp.conf")], capture_output=True, text=True,
                                  check=True).stdout
        lab.spawn(peer, ["wireguard-go", "-f", "wgp"], "wg-peer", env={"LOG_LEVEL": "error"})
        wait_for(lambda: (lab.rundir(peer) / "wireguard" / "wgp.sock").exists(), 10)
        lab.run(peer, ["wg", "setconf", "wgp", "/dev/stdin"], input=stripped)
        lab.run(peer, ["ip", "addr", "add", "100.64.2.2/32", "dev", "wgp"])
        lab.run(peer, ["ip", "link", "set", "wgp", "mtu", "1420", "up"])
        lab.run(peer, ["ip", "route", "add", "default", "dev", "wgp"])
        wait_for(t.ping, 30, 0.5)
        yield t
    finally:
        lab.close()


def test_tcp_udp_ping_reoriginated_from_the_host(rootless: Rootless) -> None:
    lab = rootless.lab
    lab.run(rootless.peer, [sys.executable, PROBE, "tcp", "198.18.60.2", "7000"])
    lab.run(rootless.peer, [sys.executable, PROBE, "udp", "198.18.60.2", "7000"])
    assert rootless.ping()
    counters = lab.run(rootless.up, ["nft", "list", "table", "inet", "count"]).stdout
    assert "saddr 198.18.60.1 counter packets 0 " not in counters, "the echo request never reached upstream"
    seen = {(a["proto"], a["src"]) for a in rootless.arrivals()}
    assert {("tcp", "198.18.60.1"), ("udp", "198.18.60.1")} <= seen, seen
    assert not any(str(a["src"]).startswith("100.64.") for a in rootless.arrivals())


def test_other_protocols_do_not_pass(rootless: Rootless) -> None:
    lab = rootless.lab
    for proto in ("132", "47"):
        lab.run(rootless.peer, [sys.executable, PROBE, "raw", "198.18.60.2", proto, "5"])
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
    assert {"wireguard-go", "microsocks"} <= names and any(n.startswith("pas") for n in names), names
    for comm, cap_eff, userns in procs:
        assert cap_eff == 0 or userns != host_userns, f"{comm} holds capabilities in the host's user namespace"
    assert any(userns == host_userns for _, _, userns in procs), "the outer process should be on the host"


def test_socks5_reaches_the_tunnel(rootless: Rootless) -> None:
    """A local program on the host reaches a peer's service through the SOCKS5 proxy."""
    lab = rootless.lab
    lab.spawn(rootless.peer, [sys.executable, PROBE, "serve", "7100", lab.dir / "peer-arrivals.jsonl"], "peer-server")
    time.sleep(0.5)
    lab.run(rootless.host, [sys.executable, PROBE, "socks", "127.0.0.1:1080", "100.64.2.2", "7100"])
    arrivals = (lab.dir / "peer-arrivals.jsonl").read_text()
    assert '"src": "100.64.2.1"' in arrivals  # it came out of the tunnel, from the appliance's tunnel address
