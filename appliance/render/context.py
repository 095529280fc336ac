"""Values derived from a Profile that several templates share (interface roles, routes, ACL rules).

Templates stay declarative: every decision is made here, in Python, where it can be tested."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, Literal

from ..dataplane.config import FilterRule as FilterRuleConfig
from ..profile.acl import AclTarget, PortRange
from ..profile.model import TUNNEL_INTERFACE, NetInterface, Profile, StaticIPv4, StaticIPv6
from ..profile.types import IPNetwork

WG_IFACE = TUNNEL_INTERFACE
# the appliance's nftables table: `nft -f` replaces it in one transaction
NFT_TABLE = "inet appliance"
# Link groups let nftables match "the uplink" whatever name the NIC gets (networkd sets them).
LINK_GROUPS = {"uplink": 1, "lan": 2}
CREDSTORE = "etc/credstore"
PRIVATE_KEY_CREDENTIAL = f"network.wireguard.private.{WG_IFACE}"
SOCKS5_PASSWORD_CREDENTIAL = "appliance.socks5.password"
SOCKS5_USER = "appliance"
# What `firewall.block_local_networks` keeps an exit node's peers from: networks that are someone's LAN
# (private, CGNAT, link-local, ULA), the cloud's metadata service among them.
LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "100.64.0.0/10", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fe80::/10"))


def psk_credential(peer: str) -> str:
    return f"network.wireguard.psk.{WG_IFACE}.{peer}"


def credential_path(name: str) -> str:
    """A key's file in the image: root-only, read by root units and handed to others as a credential."""
    return f"/{CREDSTORE}/{name}"


@dataclass(frozen=True)
class Link:
    role: Literal["uplink", "lan"]
    group: int
    iface: NetInterface

    @property
    def match_name(self) -> str | None:
        return self.iface.match.name

    @property
    def match_mac(self) -> str | None:
        return self.iface.match.mac

    @property
    def ipv4(self) -> str | StaticIPv4:
        return self.iface.ipv4

    @property
    def ipv6(self) -> str | StaticIPv6:
        return self.iface.ipv6

    @property
    def ethtool_features(self) -> dict[str, bool]:
        o = self.iface.offload
        return {"rx-udp-gro-forwarding": o.udp_gro_forwarding, "rx-gro-list": o.gro_list}

    @property
    def ethtool_args(self) -> str:
        return " ".join(f"{k} {'on' if v else 'off'}" for k, v in self.ethtool_features.items())

    @property
    def udev_match(self) -> str:
        if self.match_mac:
            return f'ATTR{{address}}=="{self.match_mac}"'
        return f'NAME=="{self.match_name}"'


@dataclass(frozen=True)
class FilterRule:
    """One nftables accept rule in the forward path from peers."""

    family: int  # 4 or 6
    sources: tuple[IPNetwork, ...]  # empty: any peer
    destination: IPNetwork
    proto: str  # tcp, udp, icmp, any
    ports: str  # nft port set, or "" for all ports
    port_ranges: tuple[PortRange, ...] = ()  # the same ports as (first, last) pairs
    excluded: tuple[IPNetwork, ...] = ()  # destinations left out (block_local_networks)

    def nft(self) -> str:
        ip = "ip" if self.family == 4 else "ip6"
        parts = []
        if self.sources:
            parts.append(f"{ip} saddr {{ {', '.join(str(s) for s in self.sources)} }}")
        if self.destination.prefixlen:
            parts.append(f"{ip} daddr {self.destination}")
        if self.excluded:
            parts.append(f"{ip} daddr != {{ {', '.join(str(n) for n in self.excluded)} }}")
        if self.proto in ("tcp", "udp"):
            parts.append(f"{self.proto} dport {self.ports}" if self.ports else f"meta l4proto {self.proto}")
        elif self.proto == "icmp":
            parts.append("meta l4proto icmp" if self.family == 4 else "meta l4proto ipv6-icmp")
        if not self.sources and not self.destination.prefixlen:
            parts.insert(0, f"meta nfproto ipv{self.family}")
        if not self.destination.prefixlen:
            parts.append(f'oifname != "{WG_IFACE}"')  # "everywhere" means out of the tunnel, not to other peers
        return " ".join(parts)

    def to_dataplane(self) -> FilterRuleConfig:
        """The rule as the userspace dataplane reads it from dataplane.json (filter)."""
        return FilterRuleConfig(tuple(str(s) for s in self.sources), str(self.destination), self.proto,
                                tuple(self.port_ranges), tuple(str(n) for n in self.excluded))


@dataclass(frozen=True)
class Context:
    profile: Profile
    links: list[Link]
    peer_routes: list[IPNetwork]
    forward_rules: list[FilterRule]
    forwarding: bool
    ipv6: bool
    sysctls: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kernel_forwarding(self) -> bool:
        return self.profile.kernel_mode

    @property
    def kernel_wireguard(self) -> bool:
        """The kernel's own WireGuard, which networkd creates from a .netdev; wireguard-go makes its
        TUN itself and takes its keys and peers from `wg set` (its unit)."""
        return self.profile.kernel_wireguard


def _links(p: Profile) -> list[Link]:
    out = []
    for role in ("uplink", "lan"):
        iface = getattr(p.interfaces, role)
        if iface is not None:
            out.append(Link(role, LINK_GROUPS[role], iface))
    return out


def _uses_ipv6(p: Profile) -> bool:
    nets: list[Any] = [*p.wireguard.addresses, *p.routing.advertise_routes]
    nets += [n for peer in p.wireguard.peers for n in peer.allowed_ips]
    return any(n.version == 6 for n in nets)


def _offered(p: Profile) -> list[IPNetwork]:
    """Where peers may go when no ACL narrows it: the advertised routes, everything for an exit node."""
    if p.is_exit_node:
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    return list(p.routing.advertise_routes)


def _excluded(p: Profile, destination: IPNetwork) -> tuple[IPNetwork, ...]:
    """The way to everywhere leaves out local networks when the profile asks (advertised routes and
    rules naming a network pass as they are)."""
    if not p.firewall.block_local_networks or destination.prefixlen:
        return ()
    return tuple(n for n in LOCAL_NETWORKS if n.version == destination.version)


def forward_rules(p: Profile) -> list[FilterRule]:
    peers = {peer.name: peer for peer in p.wireguard.peers}
    rules: list[FilterRule] = []
    if not p.firewall.acl:
        offered = _offered(p)
        if p.is_exit_node and p.firewall.block_local_networks:
            offered += list(p.routing.advertise_routes)
        for net in offered:
            rules.append(FilterRule(net.version, (), net, "any", "", excluded=_excluded(p, net)))
        return rules
    for acl in p.firewall.acl:
        chosen = list(peers.values()) if "*" in acl.peers else [peers[n] for n in acl.peers if n in peers]
        dests: list[AclTarget] = list(acl.to)
        for dest in dests:
            fam = dest.network.version
            sources: tuple[IPNetwork, ...] = ()
            if "*" not in acl.peers:
                sources = tuple(n for peer in chosen for n in peer.allowed_ips if n.version == fam)
                if not sources:
                    continue  # none of these peers has an address of this family
            ports = dest.nft_ports() if dest.ports else ""
            rules.append(FilterRule(fam, sources, dest.network, acl.proto, ports, dest.ports,
                                    excluded=_excluded(p, dest.network)))
    return rules


def _sysctls(p: Profile, links: list[Link], ipv6: bool) -> dict[str, str]:
    s: dict[str, str] = {}
    kernel = p.kernel_mode
    if kernel:
        s["net.ipv4.ip_forward"] = "1"
        s["net.ipv4.conf.all.rp_filter"] = "2"  # loose: replies to peers arrive through the policy table
        if ipv6:
            s["net.ipv6.conf.all.forwarding"] = "1"
            for link in links:
                # forwarding turns RA processing off unless accept_ra=2
                if link.role == "uplink" and link.ipv6 == "ra" and link.match_name:
                    s[_sysctl_key("net", "ipv6", "conf", link.match_name, "accept_ra")] = "2"
    if p.userspace or p.wireguard_go_tun:
        # wireguard-go asks for 7 MiB socket buffers; the default caps drop tunnel packets under load
        s["net.core.rmem_max"] = "7340032"
        s["net.core.wmem_max"] = "7340032"
    if p.userspace:
        # peers' pings leave as the dataplane's own, from unprivileged ICMP sockets
        s["net.ipv4.ping_group_range"] = "0 2147483647"
    return s


def _sysctl_key(*parts: str) -> str:
    """sysctl.d reads '.' as the separator: a key with a dotted interface name (a VLAN, eth0.10) is
    written with '/' instead, which sysctl.d reads too."""
    return "/".join(parts) if any("." in part for part in parts) else ".".join(parts)


def build_context(p: Profile) -> Context:
    links = _links(p)
    ipv6 = _uses_ipv6(p)
    routes = sorted({n for peer in p.wireguard.peers for n in peer.allowed_ips},
                    key=lambda n: (n.version, n.network_address, n.prefixlen))
    return Context(
        profile=p,
        links=links,
        peer_routes=routes,
        forward_rules=forward_rules(p),
        forwarding=p.kernel_mode,
        ipv6=ipv6,
        sysctls=_sysctls(p, links, ipv6),
    )
