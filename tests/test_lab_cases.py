"""The boot lab's expectations come from the profile: the ACL oracle and the traffic cases, checked
against profiles whose answers are known, including variants that are not the examples' shape."""

from __future__ import annotations

import shutil
from pathlib import Path

from appliance.profile import Profile, load_profile
from appliance.verify.cases import WAN_GATEWAY, TrafficCase, acl_allows, lab_variant, lan_host, traffic_cases
from conftest import PROFILES

SSH = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP5A98Fr1yv45rSbxku1EnOc8cwVe4JStajG9N4ICtdJ lab"


def _variant(tmp_path: Path, base: str, extra: str) -> Profile:
    shutil.copy(PROFILES / base, tmp_path)
    f = tmp_path / "variant.yaml"
    f.write_text(f"extends: {base}\n{extra}")
    return load_profile(f).profile


def test_oracle_follows_the_acl(tmp_path: Path) -> None:
    """The example router's ACL lets the contractor reach one host's 443 and nothing else; without
    an ACL, every peer reaches the whole advertised network, and nothing beyond it."""
    p = load_profile(PROFILES / "subnet-router.yaml").profile
    lan = lan_host(p)
    assert lan is not None
    allowed = {(peer, proto, port) for peer in ("admin", "contractor") for proto in ("tcp", "udp")
               for port in (22, 443, 7000) if acl_allows(p, peer, proto, lan, port)}
    assert ("contractor", "tcp", 443) in allowed and ("contractor", "tcp", 22) not in allowed
    assert not acl_allows(p, "admin", "udp", "203.0.113.9", 53)
    open_router = _variant(tmp_path, "subnet-router.yaml", "firewall: {acl: []}\n")
    assert acl_allows(open_router, "contractor", "tcp", lan, 22)
    assert not acl_allows(open_router, "admin", "udp", WAN_GATEWAY, 53)


def test_cases_come_from_the_profile_not_the_examples(tmp_path: Path) -> None:
    """A userspace exit node: layer-3 protocols blocked; a kernel-mode one: they arrive."""
    user = load_profile(PROFILES / "userspace-exit-node.yaml").profile
    lab, peers = lab_variant(user, SSH)
    cases = traffic_cases(lab, peers, None)
    assert cases and all(isinstance(c, TrafficCase) for c in cases)
    assert {(c.proto, c.expect) for c in cases if c.proto in ("sctp", "gre")} == {("sctp", "blocked"),
                                                                                  ("gre", "blocked")}
    kernel = _variant(tmp_path, "exit-node.yaml", "dataplane: {mode: kernel, wireguard: wireguard-go}\n")
    lab_k, peers_k = lab_variant(kernel, SSH)
    assert {(c.proto, c.expect) for c in traffic_cases(lab_k, peers_k, None) if c.proto in ("sctp", "gre")} == {
        ("sctp", "arrive"), ("gre", "arrive")}
    # the lab holds every peer's key: the declared ones are replaced
    assert {p.public_key for p in lab.wireguard.peers} == {x.public for x in peers}
    assert not {p.public_key for p in lab.wireguard.peers} & {p.public_key for p in user.wireguard.peers}


def test_without_snat_the_far_end_sees_the_peer(tmp_path: Path) -> None:
    """routing.snat: false (kernel mode): TCP/UDP arrive from the peer's own tunnel address; with SNAT
    (the control), from the appliance's address on the way."""
    router = load_profile(PROFILES / "subnet-router.yaml").profile
    plain = _variant(tmp_path, "subnet-router.yaml", "routing: {snat: false}\n")
    for p, want_peer in ((router, False), (plain, True)):
        lab, peers = lab_variant(p, SSH)
        lan = lan_host(lab)
        assert lan is not None
        cases = [c for c in traffic_cases(lab, peers, lan, {lan: "192.168.10.1", WAN_GATEWAY: "198.18.30.128"})
                 if c.proto in ("tcp", "udp") and c.expect == "arrive"]
        assert cases
        tunnel_ips = {x.name: x.tunnel_ip for x in peers}
        for c in cases:
            assert c.source == (tunnel_ips[c.peer] if want_peer else "192.168.10.1"), c


def test_ipv6_cases_follow_the_profile(tmp_path: Path) -> None:
    """The exit node's uplink takes router advertisements and its peers have ULA tunnel addresses:
    IPv6 cases to the upstream, expected from the appliance's SLAAC address (NAT66); with nat66 off,
    from the peer's own; with the uplink's IPv6 off, there are none."""
    from appliance.verify.cases import WAN_GATEWAY6, uplink_ipv6

    exit_node = load_profile(PROFILES / "exit-node.yaml").profile
    routed = _variant(tmp_path, "exit-node.yaml", "routing: {nat66: false}\n")
    no_v6 = _variant(tmp_path, "exit-node.yaml", "interfaces: {uplink: {ipv6: \"off\"}}\n")
    for p, from_peer in ((exit_node, False), (routed, True), (no_v6, None)):
        lab, peers = lab_variant(p, SSH)
        uplink6 = uplink_ipv6(lab)
        cases = [c for c in traffic_cases(lab, peers, None, {WAN_GATEWAY6: uplink6 or ""}) if c.dst == WAN_GATEWAY6]
        if from_peer is None:
            assert uplink6 is None and not cases
            continue
        assert uplink6 == "2001:db8:30:0:5054:ff:fe12:3401"  # EUI-64 of the lab's uplink MAC
        assert {c.proto for c in cases} == {"tcp", "udp", "icmp", "sctp", "gre"}
        assert all(c.expect == "arrive" for c in cases)
        own = {x.name: x.tunnel_ip6 for x in peers}
        assert all(c.source == (own[c.peer] if from_peer else uplink6) for c in cases if c.proto in ("tcp", "udp"))


def test_ipv6_lan_of_a_subnet_router(tmp_path: Path) -> None:
    """A dual-stack LAN: its IPv6 host is a case for peers with an IPv6 tunnel address, allowed by the
    ACL's IPv6 rule only (here: admin's), and the v6 upstream is never offered."""
    p = _variant(tmp_path, "subnet-router.yaml", """\
interfaces:
  uplink: {ipv6: ra}
  lan: {ipv6: {address: "fd00:10::1/64"}}
wireguard:
  addresses: [100.64.1.1/32, "fd7a:115c:a1e0:1::1/128"]
  peers:
    - {name: admin, public_key: 7R7iar3rzyJTmsBW9abcsUcXtMQJkN+EXPp7u32l4kg=,
       allowed_ips: [100.64.1.2/32, "fd7a:115c:a1e0:1::2/128"]}
    - {name: contractor, public_key: K96DZC4rXOjZrtOcKzO5/XmhczSwYZHPDHk7snb5xkw=, allowed_ips: [100.64.1.3/32]}
routing: {advertise_routes: [192.168.10.0/24, "fd00:10::/64"]}
firewall:
  acl:
    - {peers: [admin], to: ["192.168.10.0/24", "fd00:10::/64"], proto: any}
    - {peers: [contractor], to: ["192.168.10.20/32:443"], proto: tcp}
""")
    lab, peers = lab_variant(p, SSH)
    lan6 = lan_host(lab, 6)
    assert lan6 == "fd00:10::14"
    cases = traffic_cases(lab, peers, lan_host(lab), {}, lan6)
    v6 = [c for c in cases if ":" in c.dst]
    assert {c.peer for c in v6} == {"admin"}  # the contractor has no IPv6 tunnel address
    assert {(c.target, c.expect) for c in v6} == {("lan host", "arrive"), ("not advertised", "blocked")}
