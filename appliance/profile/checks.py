"""Checks that need more than one field. Each finding names the field it is about, so the loader can
point at the exact line of the YAML."""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from .errors import format_path
from .model import BOARD_ARCHES, TUNNEL_INTERFACE, NetInterface, Profile, StaticIPv4, StaticIPv6, UserspaceDataplane
from .types import IPNetwork, split_host_port

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Finding:
    path: Path
    message: str


def cross_checks(p: Profile) -> list[Finding]:
    return [
        *_board(p),
        *_roles(p),
        *_interfaces(p),
        *_peers(p),
        *_route_hijacks(p),
        *_mtu(p),
        *_dataplane(p),
        *_routing(p),
        *_acl(p),
        *_dns(p),
        *_metrics(p),
        *_health(p),
    ]


def _board(p: Profile) -> Iterator[Finding]:
    board, arch = p.system.board, p.system.arch
    if arch not in BOARD_ARCHES[board]:
        yield Finding(("system", "board"), f"board {board} runs {' or '.join(BOARD_ARCHES[board])}, not {arch}: "
                                           f"set system.arch to {BOARD_ARCHES[board][0]}")


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
        for own in (TUNNEL_INTERFACE, "lo"):
            if match.name is not None and fnmatch.fnmatchcase(own, match.name):
                what = "the tunnel's interface" if own == TUNNEL_INTERFACE else "the loopback interface"
                yield Finding(("interfaces", role, "match", "name"),
                              f"'{match.name}' matches {what} {own}: match the NIC only (e.g. en* or eth0)")
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
    owned = [((i, j), net) for i, peer in enumerate(wg.peers) for j, net in enumerate(peer.allowed_ips)]
    for (i, j), net, (oi, oj), other in overlapping(owned, same_owner=lambda a, b: a[0] == b[0]):
        yield Finding(("wireguard", "peers", i, "allowed_ips", j),
                      f"{net} overlaps {other} of peer '{wg.peers[oi].name}' "
                      f"(wireguard.peers[{oi}].allowed_ips[{oj}])")
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


Owner = TypeVar("Owner")


def overlapping(nets: list[tuple[Owner, IPNetwork]], same_owner: Callable[[Owner, Owner], bool] = lambda a, b: False
                ) -> Iterator[tuple[Owner, IPNetwork, Owner, IPNetwork]]:
    """Pairs of overlapping networks of different owners, each reported on the one given later, by
    sorting and sweeping: n log n, where comparing every pair took minutes for two peers with ~10,000
    allowed IPs each. CIDR networks overlap only by containment, so a network overlaps one that starts
    earlier exactly when it starts before that one ends. At least one pair is reported for every
    network that overlaps another owner's."""
    for version in (4, 6):
        items = sorted(((int(n.network_address), int(n.broadcast_address), k, o, n)
                        for k, (o, n) in enumerate(nets) if n.version == version),
                       key=lambda x: (x[0], -x[1], x[2]))
        # the interval reaching furthest so far, and the furthest of an owner other than its
        best: tuple[int, int, Owner, IPNetwork] | None = None
        runner_up: tuple[int, int, Owner, IPNetwork] | None = None
        for start, end, k, owner, net in items:
            other = runner_up if best is not None and same_owner(owner, best[2]) else best
            if other is not None and start <= other[0] and not same_owner(owner, other[2]):
                if k > other[1]:
                    yield owner, net, other[2], other[3]
                else:
                    yield other[2], other[3], owner, net
            entry = (end, k, owner, net)
            if best is None or end > best[0]:
                if best is not None and not same_owner(owner, best[2]):
                    runner_up = best
                best = entry
            elif not same_owner(owner, best[2]) and (runner_up is None or end > runner_up[0]):
                runner_up = entry


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
    if dp.mode != "userspace":
        return
    for key, value in (("snat", p.routing.snat), ("nat66", p.routing.nat66)):
        if value is False:
            yield Finding(("routing", key), "userspace mode re-originates peers' flows from the appliance's "
                                            f"own address (as SNAT does, always): {key}: false needs dataplane "
                                            "mode: kernel")
    where = ("dataplane", "socks5")
    ip, port = dp.socks5_address
    if ip.is_unspecified:
        yield Finding(where, f"{ip} listens on every interface: give loopback (127.0.0.1:{port}) or one static "
                             "address of the lan or uplink")
    elif not ip.is_loopback and p.link_with_address(ip) is None:
        yield Finding(where, f"{ip} is not an address of this appliance: give loopback or a static address of "
                             "interfaces.lan or interfaces.uplink")
    if port == p.wireguard.listen_port:
        yield Finding(where, "the SOCKS5 port must differ from wireguard.listen_port")
    if port == p.system.ssh.port:
        yield Finding(where, f"port {port} is sshd's (system.ssh.port): the proxy could not listen there")


# Table 52 is looked up before the main table for all of the appliance's own traffic too: a network a
# peer owns is routed into the tunnel, whatever else was there.
_MIN_PREFIX = {4: 8, 6: 16}
_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


def _own_networks(p: Profile) -> list[tuple[tuple[str | int, ...], str, IPNetwork]]:
    """What the appliance needs outside the tunnel: its links' networks, gateways and peers' endpoints
    given as addresses (field path, what it is, network)."""
    found: list[tuple[tuple[str | int, ...], str, IPNetwork]] = []
    for role, iface in p.links():
        for fam in ("ipv4", "ipv6"):
            cfg = getattr(iface, fam)
            if isinstance(cfg, StaticIPv4 | StaticIPv6):
                found.append((("interfaces", role, fam, "address"), f"the {role}'s network", cfg.address.network))
                if cfg.gateway is not None and not cfg.gateway.is_link_local:
                    found.append((("interfaces", role, fam, "gateway"), f"the {role}'s gateway",
                                  ipaddress.ip_network(cfg.gateway)))
    for i, peer in enumerate(p.wireguard.peers):
        if peer.endpoint:
            host, _ = split_host_port(peer.endpoint)
            with contextlib.suppress(ValueError):  # a DNS name is resolved on the device
                found.append((("wireguard", "peers", i, "endpoint"), f"peer '{peer.name}''s endpoint",
                              ipaddress.ip_network(host)))
    return found


def _route_hijacks(p: Profile) -> Iterator[Finding]:
    own = _own_networks(p)
    # owners (kind, index, index): a peer's allowed IP, the tunnel's network, an own network, an advertised route
    nets: list[tuple[tuple[str, int, int], IPNetwork]] = [(("own", k, 0), net) for k, (_, _, net) in enumerate(own)]
    nets += [(("route", k, 0), net) for k, net in enumerate(p.routing.advertise_routes)]
    for i, peer in enumerate(p.wireguard.peers):
        for j, net in enumerate(peer.allowed_ips):
            yield from _too_wide(("wireguard", "peers", i, "allowed_ips", j), net)
            if net.prefixlen:
                nets.append((("peer", i, j), net))
    for i, addr in enumerate(p.wireguard.addresses):
        if addr.network.prefixlen < _MIN_PREFIX[addr.version]:
            yield Finding(("wireguard", "addresses", i),
                          f"{addr} would route {addr.network} into the tunnel: give the tunnel address a prefix of "
                          f"/{_MIN_PREFIX[addr.version]} or longer (usually /32 or /128)")
        elif addr.network.prefixlen < addr.max_prefixlen:
            nets.append((("address", i, 0), addr.network))
    # only pairs of a peer's route or the tunnel's network with something the appliance needs
    for a, net, b, other in overlapping(nets, same_owner=lambda x, y: (x[0] in ("peer", "address")) ==
                                        (y[0] in ("peer", "address"))):
        if a[0] in ("own", "route"):
            a, net, b, other = b, other, a, net
        where: tuple[str | int, ...] = ("wireguard", "addresses", a[1])
        what, to = "network", "the tunnel"
        if a[0] == "peer":
            where, what, to = ("wireguard", "peers", a[1], "allowed_ips", a[2]), "route", "this peer"
        if b[0] == "route":
            yield Finding(where, f"{net} overlaps advertised route {other} (routing.advertise_routes[{b[1]}]): the "
                                 f"network behind the appliance would be routed to {to} instead")
        else:
            path, name, _ = own[b[1]]
            yield Finding(where, f"{net} overlaps {name} {other} ({format_path(path)}): this {what} would take it "
                                 "into the tunnel, away from the appliance's own link")


def _too_wide(at: tuple[str | int, ...], net: IPNetwork) -> Iterator[Finding]:
    """A peer's route that would take more than the peer's own networks into the tunnel."""
    if net.prefixlen == 0:
        yield Finding(at, f"{net} would route all of the appliance's own traffic into the tunnel (the peers' "
                          "routes are looked up first): a peer cannot be the default route")
        return
    first = net.network_address
    if first.is_unspecified or first.is_loopback or first.is_multicast:
        kind = "unspecified" if first.is_unspecified else "loopback" if first.is_loopback else "multicast"
        yield Finding(at, f"{net} is {kind}: no peer has such an address")
        return
    if net.prefixlen < _MIN_PREFIX[net.version]:
        yield Finding(at, f"{net} covers a large part of the internet, which the appliance's own traffic would "
                          f"then reach only through this peer: use /{_MIN_PREFIX[net.version]} or longer")
    if net.version == 6 and net.overlaps(_IPV4_MAPPED):
        yield Finding(at, f"{net} holds IPv4-mapped addresses (::ffff:0:0/96): write the IPv4 network")


# WireGuard's own headers: 60 bytes over IPv4, 80 over IPv6
_WG_OVERHEAD = {4: 60, 6: 80}


def _mtu(p: Profile) -> Iterator[Finding]:
    up = p.interfaces.uplink
    if up is None or up.mtu is None:
        return
    where = ("interfaces", "uplink", "mtu")
    if up.mtu < 1280 and up.ipv6 != "off":
        yield Finding(where, f"IPv6 needs an MTU of at least 1280 (got {up.mtu}): raise it or set ipv6: off")
    overhead = _WG_OVERHEAD[6 if up.ipv6 != "off" else 4]
    if up.mtu < p.wireguard.mtu + overhead:
        yield Finding(where, f"an uplink MTU of {up.mtu} cannot carry the tunnel's {p.wireguard.mtu}-byte packets "
                             f"({overhead} bytes of WireGuard over IPv{6 if overhead == 80 else 4}): lower "
                             f"wireguard.mtu to {max(1280, up.mtu - overhead)} or raise this")


def _routing(p: Profile) -> Iterator[Finding]:
    routes = p.routing.advertise_routes
    for i, net, j, other in overlapping(list(enumerate(routes))):
        yield Finding(("routing", "advertise_routes", i),
                      f"{net} overlaps advertise_routes[{j}] ({other}): advertise each network once")
    for i, net in enumerate(routes):
        if net.prefixlen == 0:
            yield Finding(("routing", "advertise_routes", i),
                          "a default route is what the exit-node role offers: add 'exit-node' to roles instead")
        for a in p.wireguard.addresses:
            if a.version == net.version and a.ip in net:
                yield Finding(("routing", "advertise_routes", i),
                              f"{net} contains the appliance's tunnel address {a.ip}: peers reach it already")


def _health(p: Profile) -> Iterator[Finding]:
    names = {peer.name for peer in p.wireguard.peers}
    for i, name in enumerate(p.health.handshake_with):
        if name not in names:
            yield Finding(("health", "handshake_with", i),
                          f"no peer named '{name}' in wireguard.peers (known: {', '.join(sorted(names))})")


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


def _dns(p: Profile) -> Iterator[Finding]:
    lan = p.interfaces.lan
    static_lan = lan is not None and isinstance(lan.ipv4, StaticIPv4)
    if p.dns.lan and not static_lan:
        yield Finding(("dns", "lan"), "answering on the LAN needs interfaces.lan with a static ipv4 address "
                                      "to listen on")
    if p.dns.domains and lan is None:
        yield Finding(("dns", "domains"), "split domains are answered by resolvers on the LAN: they need "
                                          "interfaces.lan")
    if bool(p.dns.domains) != bool(p.dns.lan_resolvers):
        missing = "lan_resolvers" if p.dns.domains else "domains"
        yield Finding(("dns", missing), "split DNS takes both: domains, and the lan_resolvers that answer them")
    seen: dict[str, int] = {}
    for i, domain in enumerate(p.dns.domains):
        if domain in seen:
            yield Finding(("dns", "domains", i), f"domain {domain} is listed twice (dns.domains[{seen[domain]}])")
        seen.setdefault(domain, i)


def _metrics(p: Profile) -> Iterator[Finding]:
    m = p.metrics
    lan = p.interfaces.lan
    for i, where in enumerate(m.listen_on):
        if where in m.listen_on[:i]:
            yield Finding(("metrics", "listen_on", i), f"'{where}' is listed twice")
        if where == "lan" and not (lan is not None and isinstance(lan.ipv4, StaticIPv4)):
            yield Finding(("metrics", "listen_on", i), "the LAN endpoint needs interfaces.lan with a static ipv4 "
                                                       "address to listen on")
    if not m.listen_on:
        return
    taken = {p.system.ssh.port: "sshd's (system.ssh.port)", 53: "the resolver's (dns)"}
    if isinstance(p.dataplane, UserspaceDataplane):
        taken[p.dataplane.socks5_address[1]] = "the SOCKS5 proxy's"
    if m.port in taken:
        yield Finding(("metrics", "port"), f"port {m.port} is {taken[m.port]}: pick another, e.g. 9586")
