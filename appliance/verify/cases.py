"""What the boot lab checks, derived from the profile alone: the lab variant of the profile, the ACL
oracle (the profile's forwarding policy, evaluated apart from the nftables renderer) and the traffic
cases, each a typed record of who sends what where and whether it must arrive."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..profile import Profile
from ..profile.acl import AclTarget
from ..secrets import generate_private_key, public_key

UPLINK_MAC = "52:54:00:12:34:01"
LAN_MAC = "52:54:00:12:34:02"
WAN_GATEWAY = "198.18.30.1"  # the "internet" side of the uplink; also the upstream server
PROBE_PORT = 7000

Expect = Literal["arrive", "blocked"]


@dataclass
class LabPeer:
    name: str
    private_key: str
    ns: str = ""
    tunnel_ip: str = ""
    setconf: str = ""  # its `wg setconf` text: set again, it starts a fresh handshake

    @property
    def public(self) -> str:
        return public_key(self.private_key)


@dataclass(frozen=True)
class TrafficCase:
    peer: str  # the lab peer that sends
    target: str  # what the destination stands for: upstream, lan host, not advertised
    dst: str
    proto: str  # tcp, udp, icmp, sctp, gre
    port: int | None
    expect: Expect
    source: str = ""  # the source address the far end sees (tcp/udp): the appliance's, or with snat off the peer's

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def lab_variant(p: Profile, ssh_public_key: str) -> tuple[Profile, list[LabPeer]]:
    """The profile as the lab boots it: the declared peers' keys replaced by keys the lab holds (so the
    lab can be each peer, with its ACLs), the lab's SSH key authorised, NICs matched by the lab's MACs."""
    data = p.model_dump(mode="json")
    peers = []
    for entry in data["wireguard"]["peers"]:
        lp = LabPeer(entry["name"], generate_private_key())
        entry["public_key"] = lp.public
        v4 = [n for n in entry["allowed_ips"] if ":" not in n and n.endswith("/32")]
        lp.tunnel_ip = v4[0].split("/")[0] if v4 else ""
        peers.append(lp)
    data["system"]["ssh"]["authorized_keys"].append(ssh_public_key)
    for role, mac in (("uplink", UPLINK_MAC), ("lan", LAN_MAC)):
        if data["interfaces"].get(role):
            data["interfaces"][role]["match"] = {"mac": mac}
    return Profile.model_validate(data), peers


def lan_host(p: Profile) -> str | None:
    """The LAN host the lab places: the first /32 an ACL names inside the LAN, else LAN address + 19."""
    lan = p.interfaces.lan
    if lan is None or isinstance(lan.ipv4, str):
        return None
    net = lan.ipv4.address.network
    for rule in p.firewall.acl:
        for dest in rule.to:
            if dest.network.prefixlen == 32 and dest.network.network_address in net:
                return str(dest.network.network_address)
    return str(lan.ipv4.address.ip + 19)


def acl_allows(p: Profile, peer: str, proto: str, dst: str, port: int | None) -> bool:
    """The profile's forwarding policy, evaluated independently of the nftables renderer."""
    ip = ipaddress.ip_address(dst)
    offered = [ipaddress.ip_network("0.0.0.0/0")] if p.is_exit_node else list(p.routing.advertise_routes)
    if not p.firewall.acl:
        return any(ip in n for n in offered if n.version == ip.version)

    def dest_ok(d: AclTarget) -> bool:
        if ip not in d.network:
            return False
        return not d.ports or (port is not None and any(lo <= port <= hi for lo, hi in d.ports))

    return any((peer in r.peers or "*" in r.peers) and r.proto in (proto, "any") and any(dest_ok(d) for d in r.to)
               for r in p.firewall.acl)


def _targets(p: Profile, lan: str | None) -> list[tuple[str, str]]:
    targets = []
    if p.is_exit_node:
        targets.append(("upstream", WAN_GATEWAY))
    if lan:
        targets.append(("lan host", lan))
    if not p.is_exit_node:  # somewhere the profile does not offer: must not arrive
        targets.append(("not advertised", WAN_GATEWAY))
    return targets


def masquerades(p: Profile) -> bool:
    """Whether the far end sees the appliance's address: kernel mode with routing.snat, and userspace
    mode always (its flows leave from the host's own sockets)."""
    return p.routing.snat or p.userspace


def traffic_cases(p: Profile, peers: list[LabPeer], lan: str | None,
                  appliance_source: dict[str, str] | None = None) -> list[TrafficCase]:
    """appliance_source: destination -> the appliance's address on the way there (the uplink's, the
    LAN's), what the far end sees when the appliance masquerades."""
    cases: list[TrafficCase] = []
    sources = appliance_source or {}
    # GRE has no ports: behind one SNAT address, a second peer's GRE to the same destination has no
    # unique conntrack tuple while the first one's lives. Layer-3 checks use one peer per target.
    layer3_done: set[str] = set()
    for peer in (x for x in peers if x.tunnel_ip):
        for label, dst in _targets(p, lan):
            protos: list[tuple[str, int | None]] = [("tcp", PROBE_PORT), ("udp", PROBE_PORT), ("icmp", None)]
            if lan and dst == lan:
                protos += [("tcp", 443), ("tcp", 22)]
            source = sources.get(dst, "") if masquerades(p) else peer.tunnel_ip
            for proto, port in protos:
                allowed = label != "not advertised" and acl_allows(p, peer.name, proto, dst, port)
                cases.append(TrafficCase(peer.name, label, dst, proto, port, "arrive" if allowed else "blocked",
                                         source))
            layer3 = label != "not advertised" and dst not in layer3_done
            if layer3 and acl_allows(p, peer.name, "any", dst, None):
                layer3_done.add(dst)
                # kernel mode routes every IP protocol; userspace mode carries only TCP, UDP and ping
                expect: Expect = "arrive" if p.kernel_mode else "blocked"
                cases += [TrafficCase(peer.name, label, dst, proto, None, expect) for proto in ("sctp", "gre")]
    return cases
