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
WAN_GATEWAY6 = "2001:db8:30::1"  # the same, by IPv6 (when the uplink has IPv6)
WAN_PREFIX6 = "2001:db8:30::/64"  # what the lab's router advertises on the uplink
PROBE_PORT = 7000

Expect = Literal["arrive", "blocked"]


@dataclass
class LabPeer:
    name: str
    private_key: str
    ns: str = ""
    tunnel_ip: str = ""
    tunnel_ip6: str = ""
    setconf: str = ""  # its `wg setconf` text: set again, it starts a fresh handshake

    @property
    def public(self) -> str:
        return public_key(self.private_key)


@dataclass(frozen=True)
class TrafficCase:
    peer: str  # the lab peer that sends
    target: str  # what the destination stands for: upstream, lan host, not advertised (its far end: wan or lan)
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
    peers = [lab_peer(entry) for entry in data["wireguard"]["peers"]]
    data["system"]["ssh"]["authorized_keys"].append(ssh_public_key)
    for role, mac in (("uplink", UPLINK_MAC), ("lan", LAN_MAC)):
        if data["interfaces"].get(role):
            data["interfaces"][role]["match"] = {"mac": mac}
    return Profile.model_validate(data), peers


def lab_peer(entry: dict[str, Any]) -> LabPeer:
    """A lab-held key for a peer entry (a profile's, as JSON): the entry's public key is set to it."""
    lp = LabPeer(entry["name"], generate_private_key())
    entry["public_key"] = lp.public
    v4 = [n for n in entry["allowed_ips"] if ":" not in n and n.endswith("/32")]
    v6 = [n for n in entry["allowed_ips"] if ":" in n and n.endswith("/128")]
    lp.tunnel_ip = v4[0].split("/")[0] if v4 else ""
    lp.tunnel_ip6 = v6[0].split("/")[0] if v6 else ""
    return lp


def lan_host(p: Profile, version: int = 4) -> str | None:
    """The LAN host the lab places (its address of that IP version, when the LAN has a static one): the
    first single address an ACL names inside the LAN, else the appliance's LAN address + 19."""
    lan = p.interfaces.lan
    cfg = None if lan is None else lan.ipv4 if version == 4 else lan.ipv6
    if cfg is None or isinstance(cfg, str):
        return None
    net = cfg.address.network
    for rule in p.firewall.acl:
        for dest in rule.to:
            if dest.network.prefixlen == dest.network.max_prefixlen and dest.network.network_address in net:
                return str(dest.network.network_address)
    return str(cfg.address.ip + 19)


def uplink_ipv6(p: Profile) -> str | None:
    """The appliance's IPv6 address on the uplink in the lab: the static one, or with router
    advertisements the SLAAC address networkd forms from the lab's prefix and the NIC's MAC (EUI-64,
    its default token); None when the uplink has no IPv6."""
    uplink = p.interfaces.uplink
    if uplink is None or uplink.ipv6 == "off":
        return None
    if not isinstance(uplink.ipv6, str):
        return str(uplink.ipv6.address.ip)
    octets = [int(x, 16) for x in UPLINK_MAC.split(":")]
    eui = bytes([octets[0] ^ 0x02, *octets[1:3], 0xFF, 0xFE, *octets[3:]])
    return str(ipaddress.ip_network(WAN_PREFIX6)[int.from_bytes(eui, "big")])


def acl_allows(p: Profile, peer: str, proto: str, dst: str, port: int | None) -> bool:
    """The profile's forwarding policy, evaluated independently of the nftables renderer."""
    ip = ipaddress.ip_address(dst)
    offered = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")] if p.is_exit_node \
        else list(p.routing.advertise_routes)
    if not p.firewall.acl:
        return any(ip in n for n in offered if n.version == ip.version)

    def dest_ok(d: AclTarget) -> bool:
        if ip not in d.network:
            return False
        return not d.ports or (port is not None and any(lo <= port <= hi for lo, hi in d.ports))

    return any((peer in r.peers or "*" in r.peers) and r.proto in (proto, "any") and any(dest_ok(d) for d in r.to)
               for r in p.firewall.acl)


def _targets(p: Profile, lans: list[str]) -> list[tuple[str, str]]:
    """(what it stands for, address): upstream and LAN hosts of each IP version the lab has there."""
    wan = [WAN_GATEWAY] + ([WAN_GATEWAY6] if uplink_ipv6(p) else [])
    targets = [("upstream", w) for w in wan] if p.is_exit_node else []
    targets += [("lan host", lan) for lan in lans]
    if not p.is_exit_node:  # somewhere the profile does not offer: must not arrive
        targets += [("not advertised", w) for w in wan]
    return targets


def masquerades(p: Profile, version: int = 4) -> bool:
    """Whether the far end sees the appliance's address for traffic of that IP version: kernel mode
    as routing.snat/nat66 say, and userspace mode always (its flows leave from the host's own sockets)."""
    return p.userspace or version in p.masquerade_families


def traffic_cases(p: Profile, peers: list[LabPeer], lan: str | None,
                  appliance_source: dict[str, str] | None = None, lan6: str | None = None) -> list[TrafficCase]:
    """appliance_source: destination -> the appliance's address on the way there (the uplink's, the
    LAN's), what the far end sees when the appliance masquerades. IPv6 destinations are checked from
    peers that have an IPv6 tunnel address, where the lab has IPv6 (the uplink, lan6)."""
    cases: list[TrafficCase] = []
    sources = appliance_source or {}
    lans = [x for x in (lan, lan6) if x]
    # GRE has no ports: behind one SNAT address, a second peer's GRE to the same destination has no
    # unique conntrack tuple while the first one's lives. Layer-3 checks use one peer per target.
    layer3_done: set[str] = set()
    for peer in peers:
        for label, dst in _targets(p, lans):
            version = ipaddress.ip_address(dst).version
            own = peer.tunnel_ip if version == 4 else peer.tunnel_ip6
            if not own:
                continue
            protos: list[tuple[str, int | None]] = [("tcp", PROBE_PORT), ("udp", PROBE_PORT), ("icmp", None)]
            if dst in lans:
                protos += [("tcp", 443), ("tcp", 22)]
            source = sources.get(dst, "") if masquerades(p, version) else own
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
