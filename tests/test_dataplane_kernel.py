"""Kernel-mode dataplane in network namespaces: peer <-> appliance <-> upstream, wireguard-go on both
ends (this host's kernel has no WireGuard module; kernel WireGuard is covered by the boot tests).

The appliance namespace gets exactly what the image gets: the rendered nftables ruleset and sysctls,
and the reconciler (`python -m appliance.dataplane`) applying the rendered dataplane.json. The peer
is configured from `appliance peer` output. Packets are checked where they arrive."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.profile import load_profile
from appliance.render import render
from appliance.secrets import SecretStore, generate_private_key, public_key
from appliance.verify import dplab, probe
from appliance.verify.netns import Lab, protocol_counters, start_peer, start_wireguard_go, wait_for
from conftest import REPO, require_tool

pytestmark = pytest.mark.root

PROBE = str(Path(probe.__file__))
UPLINK_MAC = "52:54:00:12:34:01"
PORT = 7000

PROFILE = """\
name: lab-exit
roles: [exit-node]
interfaces:
  uplink:
    match: {{mac: "{mac}"}}
    ipv4: {{address: 198.18.20.1/24, gateway: 198.18.20.2}}
    offload: {{udp_gro_forwarding: true, gro_list: false}}
wireguard:
  addresses: [100.64.0.1/32]
  listen_port: 51820
  peers:
    - {{name: client, public_key: "{client}", allowed_ips: [100.64.0.2/32]}}
    - {{name: spare, public_key: "{spare}", allowed_ips: [100.64.0.3/32, 10.99.0.0/24]}}
dataplane: {{mode: kernel, wireguard: wireguard-go}}
routing: {{snat: true, mss_clamp: true}}
"""




class Topology:
    def __init__(self, lab: Lab, root: Path, config: Path, dp: dict[str, Any]):
        self.lab, self.root, self.config, self.dp = lab, root, config, dp
        self.peer, self.appl, self.up = (f"{lab.prefix}-{n}" for n in ("peer", "appl", "up"))

    def reconcile(self, command: str = "apply", check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.run(self.appl, [sys.executable, "-m", "appliance.dataplane", "--config", self.config,
                                        command, "--json"], check=check)

    def ping(self, count: int = 2) -> bool:
        return self.lab.run(self.peer, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", "198.18.20.2"],
                            check=False).returncode == 0


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    for tool in ("wireguard-go", "wg", "nft", "ethtool", "ping"):
        require_tool(tool)
    work = tmp_path_factory.mktemp("dp")
    client_key = generate_private_key()
    (work / "client.key").write_text(client_key + "\n")
    profile = work / "lab-exit.yaml"
    profile.write_text(PROFILE.format(mac=UPLINK_MAC, client=public_key(client_key),
                                      spare=public_key(generate_private_key())))
    p = load_profile(profile).profile
    store = SecretStore(work / "secrets")
    tree = render(p, store.appliance_keys(p.name, []))
    root = work / "root"
    tree.write(root, include_secrets=True)
    dp = json.loads((root / "etc/appliance/dataplane.json").read_text())
    dp["wireguard"]["private_key_file"] = str(root / dp["wireguard"]["private_key_file"].lstrip("/"))
    # net.core.* buffer limits belong to the whole host: read-only inside a lab namespace
    dp["sysctl"] = {k: v for k, v in dp["sysctl"].items() if not k.startswith("net.core.")}
    config = work / "dataplane.json"
    config.write_text(json.dumps(dp))

    lab = Lab("k")
    try:
        peer, appl, up = lab.ns("peer"), lab.ns("appl"), lab.ns("up")
        t = Topology(lab, root, config, dp)
        lab.veth((peer, "p0", "198.18.10.2/24"), (appl, "a0", "198.18.10.1/24"))
        lab.veth((appl, "a1", "198.18.20.1/24"), (up, "u0", "198.18.20.2/24"), mac_a=UPLINK_MAC)
        lab.run(appl, ["ip", "route", "add", "default", "via", "198.18.20.2"])
        lab.run(appl, ["nft", "-f", root / "etc/nftables.conf"])
        start_wireguard_go(lab, appl, "wg0", "wg-appl")
        t.reconcile()
        # the upstream server, with counters for what arrives from the appliance
        lab.run(up, ["nft", "-f", "-"], input=protocol_counters("u0", echo_from="198.18.20.1"))
        lab.serve(up, str(PORT), lab.dir / "arrivals.jsonl", "probe-server")
        # the peer, from `appliance peer` output
        conf = subprocess.run([sys.executable, "-m", "appliance", "peer", str(profile), "client", "--endpoint",
                               "198.18.10.1:51820", "--private-key-file", str(work / "client.key"),
                               "--secrets", str(work / "secrets")], capture_output=True, text=True, check=True,
                              cwd=REPO).stdout
        start_peer(lab, peer, "wgp", conf, mtu=1420)
        lab.run(peer, ["ip", "route", "add", "default", "dev", "wgp"])
        wait_for(lambda: t.ping(1), 20)
        yield t
    finally:
        lab.close()


def test_tcp_udp_ping_arrive_snatted(topo: Topology) -> None:
    lab = topo.lab
    lab.run(topo.peer, [sys.executable, PROBE, "tcp", "198.18.20.2", str(PORT)])
    lab.run(topo.peer, [sys.executable, PROBE, "udp", "198.18.20.2", str(PORT)])
    assert topo.ping(3)
    seen = {(a["proto"], a["src"]) for a in topo.lab.arrivals()}
    assert ("tcp", "198.18.20.1") in seen and ("udp", "198.18.20.1") in seen
    assert not any(a["src"].startswith("100.64.") for a in topo.lab.arrivals()), "tunnel address leaked: no SNAT"
    counters = lab.run(topo.up, ["nft", "list", "table", "inet", "count"]).stdout
    assert "echo-request ip saddr 198.18.20.1 counter packets 0" not in counters


def test_other_protocols_pass_in_kernel_mode(topo: Topology) -> None:
    """Layer 3: SCTP and GRE from the peer reach upstream (raw packets, counted by nftables there)."""
    before = topo.lab.run(topo.up, ["nft", "-j", "list", "table", "inet", "count"]).stdout
    for proto in ("132", "47"):
        topo.lab.run(topo.peer, [sys.executable, PROBE, "raw", "198.18.20.2", proto, "5"])

    def arrived(proto: str) -> int:
        after = topo.lab.run(topo.up, ["nft", "-j", "list", "table", "inet", "count"]).stdout
        return _counter(after, proto) - _counter(before, proto)

    wait_for(lambda: arrived("sctp") >= 5 and arrived("gre") >= 5, 5, 0.1)


def _counter(nft_json: str, proto: str) -> int:
    for item in json.loads(nft_json)["nftables"]:
        rule = item.get("rule")
        if rule and any(proto in json.dumps(e) for e in rule["expr"] if "match" in e):
            return int(next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e))
    raise AssertionError(f"no {proto} counter")


def test_table_and_rule_match_config(topo: Topology) -> None:
    routes = json.loads(topo.lab.run(topo.appl, ["ip", "-j", "route", "show", "table", "52"]).stdout)
    assert {r["dst"] for r in routes} == {"100.64.0.2", "100.64.0.3", "10.99.0.0/24"}
    assert all(r["dev"] == "wg0" for r in routes)
    assert {d["destination"] for d in topo.dp["routing"]["routes"]} == {"100.64.0.2/32", "100.64.0.3/32",
                                                                          "10.99.0.0/24"}
    rules = json.loads(topo.lab.run(topo.appl, ["ip", "-j", "rule", "show", "table", "52"]).stdout)
    assert [(r["priority"], r["table"]) for r in rules] == [(5270, "52")]
    wg = topo.lab.run(topo.appl, ["wg", "show", "wg0", "allowed-ips"]).stdout
    assert "100.64.0.2/32" in wg and "10.99.0.0/24" in wg


def test_reconcile_is_idempotent(topo: Topology) -> None:
    again = json.loads(topo.reconcile().stdout)
    assert again["changes"] == [] and again["errors"] == []
    status = topo.reconcile("status")
    assert json.loads(status.stdout)["converged"] is True


def test_offloads_applied_to_the_uplink(topo: Topology) -> None:
    features = topo.lab.run(topo.appl, ["ethtool", "-k", "a1"]).stdout
    assert "rx-udp-gro-forwarding: on" in features and "rx-gro-list: off" in features
    tun = topo.lab.run(topo.appl, ["ethtool", "-k", "wg0"]).stdout  # wireguard-go 0.0.20231211: TSO on the TUN
    assert "tx-tcp-segmentation: on" in tun


def test_converges_after_change_without_teardown(topo: Topology) -> None:
    lab = topo.lab
    index = json.loads(lab.run(topo.appl, ["ip", "-j", "link", "show", "wg0"]).stdout)[0]["ifindex"]
    dp = json.loads(topo.config.read_text())
    original = json.dumps(dp)
    dp["wireguard"]["peers"] = [p for p in dp["wireguard"]["peers"] if p["name"] != "spare"]
    dp["routing"]["routes"] = [r for r in dp["routing"]["routes"] if r["destination"] == "100.64.0.2/32"]
    dp["wireguard"]["addresses"] = ["100.64.0.1/32", "100.64.0.254/32"]
    topo.config.write_text(json.dumps(dp))
    try:
        changes = json.loads(topo.reconcile().stdout)["changes"]
        assert any("remove peer" in c for c in changes)
        assert any("remove route 10.99.0.0/24" in c for c in changes)
        assert any("add address 100.64.0.254/32" in c for c in changes)
        assert json.loads(topo.reconcile("status").stdout)["converged"]
        routes = json.loads(lab.run(topo.appl, ["ip", "-j", "route", "show", "table", "52"]).stdout)
        assert {r["dst"] for r in routes} == {"100.64.0.2"}
        assert "10.99.0.0/24" not in lab.run(topo.appl, ["wg", "show", "wg0", "allowed-ips"]).stdout
        after = json.loads(lab.run(topo.appl, ["ip", "-j", "link", "show", "wg0"]).stdout)[0]["ifindex"]
        assert after == index, "the interface was torn down"
        assert topo.ping(1), "traffic stopped while converging"
    finally:
        topo.config.write_text(original)
        topo.reconcile()


def test_restart_of_wireguard_go_is_healed_by_the_watcher(topo: Topology) -> None:
    """Like systemd's Restart=always: wireguard-go is killed and started again; the watching
    reconciler sees the new TUN and configures it. Traffic returns; the time is reported."""
    lab = topo.lab
    watcher = lab.spawn(topo.appl, [sys.executable, "-m", "appliance.dataplane", "--config", topo.config, "watch",
                                    "--interval", "30"], "watcher")
    try:
        wait_for(lambda: "watching links" in lab.log("watcher"), 15)
        wg_proc = next(p for p, log in lab.procs if log.name == "wg-appl.log")
        t0 = time.monotonic()
        Lab.stop(wg_proc)
        wait_for(lambda: lab.run(topo.appl, ["ip", "link", "show", "wg0"], check=False).returncode != 0, 10)
        start_wireguard_go(lab, topo.appl, "wg0", "wg-appl")
        recovered = wait_for(lambda: topo.ping(1), 30)
        total = time.monotonic() - t0
        print(f"\ntraffic back {total:.1f} s after wireguard-go was killed ({recovered:.1f} s after restart)")
        # the watcher restores the peer's endpoint and starts the handshake itself; without that the
        # peer's rekey timer would take ~15 s
        assert total < 10
        assert watcher.poll() is None
    finally:
        Lab.stop(watcher)


def test_watcher_brings_nothing_up_before_the_firewall(topo: Topology) -> None:
    """The service starts with nftables.service, not after it: until the appliance's table is in the
    kernel, no forwarding and no WireGuard key; then both, without a restart."""
    lab = topo.lab
    ns = lab.ns("early")
    start_wireguard_go(lab, ns, "wg0", "wg-early")
    lab.run(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=0"])  # a new namespace starts with the host's
    watcher = lab.spawn(ns, [sys.executable, "-m", "appliance.dataplane", "--config", topo.config, "watch"],
                        "watcher-early")

    def state() -> tuple[str, str]:
        forward = lab.run(ns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
        return forward, lab.run(ns, ["wg", "show", "wg0", "private-key"]).stdout.strip()

    try:
        wait_for(lambda: "waiting for the firewall (table inet appliance)" in lab.log("watcher-early"), 15)
        time.sleep(1)  # a window in which it must configure nothing
        assert state() == ("0", "(none)") and watcher.poll() is None
        lab.run(ns, ["nft", "-f", topo.root / "etc/nftables.conf"])
        wait_for(lambda: "watching links" in lab.log("watcher-early"), 15)
        forward, key = state()
        assert forward == "1" and key not in ("", "(none)")
    finally:
        Lab.stop(watcher)


def test_metrics_read_the_real_device(topo: Topology) -> None:
    """`appliance-dataplane metrics --print` in the appliance's namespace, against the running
    wireguard-go after the traffic above: Prometheus' parser reads it, the client's handshake and
    bytes are there, and the private key is not."""
    from prometheus_client.parser import text_string_to_metric_families

    out = topo.lab.run(topo.appl, [sys.executable, "-m", "appliance.dataplane", "--config", topo.config, "metrics",
                                   "--print"]).stdout
    assert topo.dp["wireguard"]["private_key_file"] and "PRIVATE" not in out
    key = Path(topo.dp["wireguard"]["private_key_file"]).read_text().strip()
    assert key not in out
    families = {f.name: f for f in text_string_to_metric_families(out)}
    client = {s.labels["peer"]: s.value for s in families["wireguard_peer_received_bytes"].samples}["client"]
    handshake = {s.labels["peer"]: s.value
                 for s in families["wireguard_peer_last_handshake_timestamp_seconds"].samples}["client"]
    assert client > 0 and handshake > 0


def _v6_lab(tag: str, extra: str = "") -> dplab.DataplaneLab:
    """dplab's kernel mode (wireguard-go, the rendered ruleset and sysctls, the reconciler), dual
    stack: the peer's ULA tunnel address fd7a:115c:a1e0:9::2, upstream 2001:db8:60::/64."""
    for tool in ("wireguard-go", "wg", "nft", "ping"):
        require_tool(tool)
    d = dplab.start("kernel", tag=tag, extra=extra)
    try:
        d.lab.run(d.server, ["nft", "-f", "-"], input=protocol_counters("s0"))
        d.lab.serve(d.server, str(PORT), d.lab.dir / "arrivals.jsonl", "upstream")
        return d
    except BaseException:
        d.close()
        raise


def _v6_traffic(d: dplab.DataplaneLab) -> set[tuple[str, str]]:
    """TCP, UDP and ICMPv6 echo from the peer to upstream over IPv6, and SCTP (layer 3: kernel mode
    passes every protocol): what arrived, as (protocol, source)."""
    lab = d.lab
    before = lab.run(d.server, ["nft", "-j", "list", "table", "inet", "count"]).stdout
    lab.run(d.client, [sys.executable, PROBE, "tcp", dplab.SERVER6, str(PORT)])
    lab.run(d.client, [sys.executable, PROBE, "udp", dplab.SERVER6, str(PORT)])
    lab.run(d.client, ["ping", "-c", "2", "-i", "0.2", "-W", "2", dplab.SERVER6])
    lab.run(d.client, [sys.executable, PROBE, "raw", dplab.SERVER6, "132", "3"])

    def arrived(proto: str) -> int:
        after = lab.run(d.server, ["nft", "-j", "list", "table", "inet", "count"]).stdout
        return _counter(after, proto) - _counter(before, proto)

    wait_for(lambda: arrived('"icmpv6"') >= 2 and arrived("sctp") >= 3, 5, 0.1)
    return {(a["proto"], a["src"]) for a in lab.arrivals()}


def test_ipv6_from_a_ula_tunnel_is_masqueraded() -> None:
    """NAT66 by default for a ULA tunnel: upstream sees the appliance's IPv6 address; the MSS of
    IPv6 TCP is clamped too (the peer's tunnel MTU is the appliance's; clamping keeps it at 1420 - 60)."""
    d = _v6_lab("6n")
    try:
        assert _v6_traffic(d) == {("tcp", dplab.APPLIANCE_UPLINK6), ("udp", dplab.APPLIANCE_UPLINK6)}
        mss = d.lab.run(d.client, [sys.executable, PROBE, "tcp", dplab.SERVER6, str(PORT)]).stdout
        assert int(mss.split("mss=")[1]) <= 1420 - 60, mss
        ruleset = d.lab.run(d.appliance, ["nft", "list", "table", "inet", "appliance"]).stdout
        masquerade = [line.strip() for line in ruleset.splitlines() if "masquerade" in line]
        assert len(masquerade) == 1 and "nfproto" not in masquerade[0], ruleset  # one rule, both families
    finally:
        d.close()


def test_ipv6_routed_with_nat66_off_while_ipv4_stays_masqueraded() -> None:
    """routing.nat66: false (a globally routed tunnel prefix): upstream sees the peer's own IPv6
    address and routes it back via the appliance, while IPv4 is still SNATed (the control)."""
    d = _v6_lab("6r", "routing: {nat66: false}\n")
    try:
        d.lab.run(d.server, ["ip", "-6", "route", "add", "fd7a:115c:a1e0:9::/64", "via", dplab.APPLIANCE_UPLINK6])
        assert _v6_traffic(d) == {("tcp", "fd7a:115c:a1e0:9::2"), ("udp", "fd7a:115c:a1e0:9::2")}
        d.lab.run(d.client, [sys.executable, PROBE, "tcp", dplab.SERVER, str(PORT)])
        assert ("tcp", dplab.APPLIANCE_UPLINK) in {(a["proto"], a["src"]) for a in d.lab.arrivals()}
        ruleset = d.lab.run(d.appliance, ["nft", "list", "table", "inet", "appliance"]).stdout
        assert [line.split()[:3] for line in ruleset.splitlines() if "masquerade" in line] == [
            ["meta", "nfproto", "ipv4"]], ruleset
    finally:
        d.close()


BANNER = """import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8); print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(b"SSH-2.0-lab\\r\\n"); c.close()
"""


def test_health_follows_the_profile(topo: Topology, tmp_path: Path) -> None:
    """`appliance-dataplane health` against the real firewall, links and wireguard-go of the lab:
    healthy as rendered (an SSH banner on the profile's port standing in for sshd); each planted
    fault (a firewall table that is not loaded, an uplink that is not there, a peer the device does
    not have, nothing on the SSH port, a peer that never shook hands) makes it unhealthy, naming the
    check, and the verdict lands in the state directory."""
    from appliance.dataplane.health import HealthConfig

    lab = topo.lab
    proc = lab.spawn(topo.appl, [sys.executable, "-c", BANNER, "2222"], "sshd-banner")
    wait_for(lambda: "ready" in lab.log("sshd-banner") or proc.poll() is not None, 10, 0.05)
    assert topo.ping(1)  # the client has shaken hands

    def health(dp: dict[str, Any] | None = None, **kw: Any) -> tuple[int, dict[str, Any]]:
        cfg = tmp_path / "dataplane.json"
        cfg.write_text(json.dumps(dp or topo.dp))
        hc = tmp_path / "health.json"
        hc.write_text(HealthConfig(**{"ssh_port": 2222, "grace": 10, **kw}).dumps())
        state = tmp_path / "state"
        shutil.rmtree(state, ignore_errors=True)
        run = lab.run(topo.appl, [sys.executable, "-m", "appliance.dataplane", "--config", cfg, "health",
                                  "--health-config", hc, "--state-dir", state, "--grace", "1"], check=False)
        verdict = json.loads((state / "health.json").read_text())
        assert (run.returncode == 0) == verdict["healthy"], run.stdout + run.stderr
        return run.returncode, verdict

    rc, verdict = health()
    assert rc == 0 and verdict["healthy"] and verdict["problems"] == {}, verdict
    assert health(handshake_with=("client",), within=10)[0] == 0

    def broken(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        dp: dict[str, Any] = json.loads(json.dumps(topo.dp))
        change(dp)
        return dp

    faults = {
        "firewall": broken(lambda d: d["firewall"].update(table="inet not-loaded")),
        "uplink": broken(lambda d: d["interfaces"]["uplink"]["match"].update(mac="52:54:00:ff:ff:ff")),
        "tunnel": broken(lambda d: d["wireguard"]["peers"].append({**d["wireguard"]["peers"][0], "name": "ghost",
                                                                   "public_key": public_key(generate_private_key())})),
    }
    for check, dp in faults.items():
        rc, verdict = health(dp)
        assert rc == 1 and set(verdict["problems"]) == {check}, verdict
    rc, verdict = health(ssh_port=2223)
    assert rc == 1 and set(verdict["problems"]) == {"ssh"}, verdict
    rc, verdict = health(handshake_with=("spare",), within=1)
    assert rc == 1 and verdict["problems"] == {"handshake": "no handshake yet with spare"}, verdict
