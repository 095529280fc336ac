"""The uplink's DHCP lease renews through the rendered firewall, which has no rule for DHCP replies:
networkd's client reads them from a packet socket (before nftables) until it is bound, and the
replies to its unicast renewals are conntrack's "established". A rule accepting UDP port 67 -> 68
from anyone would let any host on the uplink talk to the client's socket.

The real systemd-networkd and dnsmasq (a 2-minute lease: renewal after ~53 s) in namespaces, twice at
once: the rendered ruleset, and the same with DHCP replies dropped before conntrack sees them (the
control: there the renewal goes unanswered)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.profile import load_profile
from appliance.render import render
from appliance.secrets import ApplianceKeys, generate_private_key
from appliance.verify.netns import Lab
from conftest import require_tool

pytestmark = pytest.mark.root

PROFILE = """\
name: dhcp-lab
roles: [exit-node]
interfaces:
  uplink: {match: {name: "u0"}, ipv4: dhcp}
wireguard:
  addresses: [100.64.0.1/32]
"""
NETWORKD = """\
set -e
mount -o remount,ro /sys  # no udev here: networkd does not wait for it when /sys is read-only
mkdir -p /run/systemd/netif /run/systemd/network
chown systemd-network:systemd-network /run/systemd/netif
SYSTEMD_LOG_LEVEL=debug SYSTEMD_LOG_TARGET=console exec "$0"
"""
DROP_REPLIES = "insert rule inet appliance input udp sport 67 udp dport 68 counter drop comment \"control\"\n"


def _renewals(log: Path) -> tuple[int, int]:
    """(renewal requests, ACKs after the first renewal request) in networkd's log."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "DHCPv4 client:" in ln]
    first = next((i for i, ln in enumerate(lines) if "REQUEST (renewing)" in ln), None)
    if first is None:
        return 0, 0
    return (sum("REQUEST (renewing)" in ln for ln in lines),
            sum(ln.rstrip().endswith("ACK") for ln in lines[first:]))


def test_lease_renews_through_the_rendered_firewall(tmp_path: Path) -> None:
    require_tool("dnsmasq")
    networkd = require_tool("systemd-networkd")
    profile = tmp_path / "dhcp-lab.yaml"
    profile.write_text(PROFILE)
    tree = render(load_profile(profile).profile, ApplianceKeys(generate_private_key(), {}))
    tree.write(tmp_path / "root")
    network = tmp_path / "network"
    network.mkdir()
    (network / "10-uplink.network").write_text(tree.text("etc/systemd/network/10-uplink.network"))
    ruleset = tmp_path / "root/etc/nftables.conf"
    assert "dport 68" not in ruleset.read_text()
    lab = Lab("h")
    try:
        logs = {}
        for case in ("rendered", "control"):
            server, appliance = lab.ns(f"{case[0]}s"), lab.ns(f"{case[0]}a")
            lab.veth((appliance, "u0", ""), (server, "s0", "198.18.70.1/24"))
            lab.spawn(server, ["dnsmasq", "--keep-in-foreground", "--no-daemon", "--port=0", "--interface=s0",
                               "--bind-interfaces", "--dhcp-range=198.18.70.100,198.18.70.150,255.255.255.0,2m",
                               f"--dhcp-leasefile={lab.dir / case}.leases", "--no-ping"], f"dnsmasq-{case}")
            lab.run(appliance, ["nft", "-f", ruleset])
            if case == "control":
                lab.run(appliance, ["nft", "-f", "-"], input=DROP_REPLIES)
            lab.spawn(appliance, ["sh", "-c", NETWORKD, networkd], f"networkd-{case}",
                      binds=[(network, "/etc/systemd/network")])
            logs[case] = lab.dir / f"networkd-{case}.log"
        deadline = time.monotonic() + 100
        while time.monotonic() < deadline and (_renewals(logs["rendered"])[1] == 0
                                               or _renewals(logs["control"])[0] == 0):
            time.sleep(1)
        time.sleep(3)  # an answer to the control's renewal would have come by now
        requests, acks = _renewals(logs["rendered"])
        assert requests >= 1 and acks >= 1, logs["rendered"].read_text()[-3000:]
        # the control got its lease (packet socket) but no answer to its renewal: the check can fail
        control = logs["control"].read_text(errors="replace")
        assert "DHCPv4 client: ACK" in control, control[-3000:]
        assert _renewals(logs["control"])[0] >= 1 and _renewals(logs["control"])[1] == 0, control[-3000:]
    finally:
        lab.close()
