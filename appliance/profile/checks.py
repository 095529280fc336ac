"""Checks that need more than one field. Each finding names the field it is about, so the loader can
point at the exact line of the YAML."""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

from .model import NetInterface, Profile, StaticIPv4, StaticIPv6
from .types import IPNetwork

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Finding:
    path: Path
    message: str


def cross_checks(p: Profile) -> list[Finding]:
    return [
        *_roles(p),
        *_interfaces(p),
        *_peers(p),
        *_dataplane(p),
        *_routing(p),
        *_acl(p),
    ]


def _roles(p: Profile) -> Iterator[Finding]:
    seen: set[str] = set()
    for i, role in enumerate(p.roles):
        if role in seen:
            yield Finding(("roles", i), f"role '{role}' is listed twice")
        seen.add(role)
    if p.is_exit_node and p.interfaces.uplink is None:
        yield Finding(("interfaces",), "an exit-node needs interfaces.uplink: the NIC its peers' traffic leaves by")
    if p.is_subnet_router and not p.routing.advertise_routes:
        yield Finding(("routing",), "a subnet-router needs routing.advertise_routes: the networks it offers peers")


def _interfaces(p: Profile) -> Iterator[Finding]:
    ifaces = {k: v for k, v in (("uplink", p.interfaces.uplink), ("lan", p.interfaces.lan)) if v is not None}
    if not ifaces:
        yield Finding(("interfaces",), "at least one interface (uplink or lan) is needed to reach the appliance")
    for role, iface in ifaces.items():
        match = iface.match
        if (match.name is None) == (match.mac is None):
            yield Finding(("interfaces", role, "match"), "give exactly one of name (a glob such as en*) or mac")
        yield from _static_gateway(role, iface)
    up, lan = ifaces.get("uplink"), ifaces.get("lan")
    if up and lan and _same_match(up, lan):
        yield Finding(("interfaces", "lan", "match"), "uplink and lan match the same NIC: give each its own match")
    if lan:
        for fam in ("ipv4", "ipv6"):
            cfg = getattr(lan, fam)
            if isinstance(cfg, StaticIPv4 | StaticIPv6) and cfg.gateway is not None:
                yield Finding(("interfaces", "lan", fam, "gateway"),
                              "the default gateway belongs on the uplink, not on the lan")


def _same_match(a: NetInterface, b: NetInterface) -> bool:
    if a.match.mac and a.match.mac == b.match.mac:
        return True
    na, nb = a.match.name, b.match.name
    return bool(na and nb and (na == nb or fnmatch.fnmatchcase(nb, na) or fnmatch.fnmatchcase(na, nb)))


def _static_gateway(role: str, iface: NetInterface) -> Iterator[Finding]:
    for fam in ("ipv4", "ipv6"):
        cfg = getattr(iface, fam)
        if isinstance(cfg, StaticIPv4 | StaticIPv6):
            expected = 4 if fam == "ipv4" else 6
            if cfg.address.version != expected:
                yield Finding(("interfaces", role, fam, "address"), f"expected an IPv{expected} address")
            elif cfg.gateway is not None:
                if cfg.gateway.version != expected:
                    yield Finding(("interfaces", role, fam, "gateway"), f"expected an IPv{expected} gateway")
                elif cfg.gateway not in cfg.address.network and not cfg.gateway.is_link_local:
                    yield Finding(("interfaces", role, fam, "gateway"),
                                  f"gateway {cfg.gateway} is outside {cfg.address.network}")


def _peers(p: Profile) -> Iterator[Finding]:
    wg = p.wireguard
    names: dict[str, int] = {}
    keys: dict[str, int] = {}
    for i, peer in enumerate(wg.peers):
        if peer.name in names:
            yield Finding(("wireguard", "peers", i, "name"),
                          f"peer name '{peer.name}' is already used by peers[{names[peer.name]}]")
        names.setdefault(peer.name, i)
        if peer.public_key in keys:
            yield Finding(("wireguard", "peers", i, "public_key"),
                          f"this public key is already used by peers[{keys[peer.public_key]}]")
        keys.setdefault(peer.public_key, i)
    # WireGuard gives an address to one peer only: a later peer silently takes it from an earlier one.
    owned: list[tuple[int, int, IPNetwork]] = []
    for i, peer in enumerate(wg.peers):
        for j, net in enumerate(peer.allowed_ips):
            for (oi, oj, other) in owned:
                if oi != i and _overlap(net, other):
                    yield Finding(("wireguard", "peers", i, "allowed_ips", j),
                                  f"{net} overlaps {other} of peer '{wg.peers[oi].name}' "
                                  f"(wireguard.peers[{oi}].allowed_ips[{oj}])")
            owned.append((i, j, net))
    own = [a.ip for a in wg.addresses]
    for i, peer in enumerate(wg.peers):
        for j, net in enumerate(peer.allowed_ips):
            for ip in own:
                if ip.version == net.version and ip in net:
                    yield Finding(("wireguard", "peers", i, "allowed_ips", j),
                                  f"{net} contains the appliance's own tunnel address {ip}")
    seen_addr: set[object] = set()
    for i, addr in enumerate(wg.addresses):
        if addr.ip in seen_addr:
            yield Finding(("wireguard", "addresses", i), f"address {addr.ip} is listed twice")
        seen_addr.add(addr.ip)


def _overlap(a: IPNetwork, b: IPNetwork) -> bool:
    if isinstance(a, ipaddress.IPv4Network) and isinstance(b, ipaddress.IPv4Network):
        return a.overlaps(b)
    if isinstance(a, ipaddress.IPv6Network) and isinstance(b, ipaddress.IPv6Network):
        return a.overlaps(b)
    return False


def _dataplane(p: Profile) -> Iterator[Finding]:
    dp = p.dataplane
    if dp.mode == "userspace" and dp.wireguard == "kernel":
        yield Finding(("dataplane", "wireguard"),
                      "userspace mode runs wireguard-go without privileges; kernel WireGuard needs mode: kernel")
    if dp.mode == "userspace" and p.wireguard.listen_port == _socks5_port(p):
        yield Finding(("dataplane", "socks5"), "the SOCKS5 port must differ from wireguard.listen_port")


def _socks5_port(p: Profile) -> int | None:
    socks5 = getattr(p.dataplane, "socks5", None)
    return int(socks5.rsplit(":", 1)[1]) if socks5 else None


def _routing(p: Profile) -> Iterator[Finding]:
    routes = p.routing.advertise_routes
    for i, net in enumerate(routes):
        for j in range(i):
            other = routes[j]
            if _overlap(net, other):
                yield Finding(("routing", "advertise_routes", i),
                              f"{net} overlaps advertise_routes[{j}] ({other}): advertise each network once")
        if net.prefixlen == 0:
            yield Finding(("routing", "advertise_routes", i),
                          "a default route is what the exit-node role offers: add 'exit-node' to roles instead")
        for a in p.wireguard.addresses:
            if a.version == net.version and a.ip in net:
                yield Finding(("routing", "advertise_routes", i),
                              f"{net} contains the appliance's tunnel address {a.ip}: peers reach it already")


def _acl(p: Profile) -> Iterator[Finding]:
    names = {peer.name for peer in p.wireguard.peers}
    for i, rule in enumerate(p.firewall.acl):
        for j, name in enumerate(rule.peers):
            if name != "*" and name not in names:
                known = ", ".join(sorted(names)) or "none declared"
                yield Finding(("firewall", "acl", i, "peers", j),
                              f"no peer named '{name}' in wireguard.peers (known: {known})")
        if rule.proto not in ("tcp", "udp"):
            for j, dest in enumerate(rule.to):
                if dest.ports:
                    yield Finding(("firewall", "acl", i, "to", j),
                                  f"ports need proto: tcp or udp (this rule has proto: {rule.proto})")
        if not p.is_exit_node:
            for j, dest in enumerate(rule.to):
                if dest.network.prefixlen == 0:
                    yield Finding(("firewall", "acl", i, "to", j),
                                  "a rule to everywhere needs the exit-node role")
