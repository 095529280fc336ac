"""Addresses, MTU, routes in the policy table and the rule that looks it up, with pyroute2.

Only what the appliance owns is touched: routes it made carry RTPROT_APPLIANCE, rules are those
pointing at its table, and IPv6 link-local addresses are left to the kernel."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from pyroute2.iproute.linux import IPRoute

from .config import RTPROT_APPLIANCE

FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


def link_index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_link(ipr: IPRoute, name: str, kind: str, mtu: int, dry: bool) -> tuple[int | None, list[str]]:
    """Create the link if kind is given and it is missing; then MTU and up. (None, []) if missing."""
    changes: list[str] = []
    idx = link_index(ipr, name)
    if idx is None:
        if not kind:
            return None, []
        changes.append(f"create {kind} link {name}")
        if dry:
            return None, changes
        ipr.link("add", ifname=name, kind=kind)
        idx = link_index(ipr, name)
        if idx is None:
            raise RuntimeError(f"{name} was created and is gone")
    link = ipr.get_links(idx)[0]
    if link.get_attr("IFLA_MTU") != mtu:
        changes.append(f"{name} mtu {mtu}")
        if not dry:
            ipr.link("set", index=idx, mtu=mtu)
    if not link["flags"] & 1:  # IFF_UP
        changes.append(f"{name} up")
        if not dry:
            ipr.link("set", index=idx, state="up")
    return idx, changes


def ensure_addresses(ipr: IPRoute, idx: int, name: str, wanted: tuple[str, ...], dry: bool) -> list[str]:
    want = {ipaddress.ip_interface(a) for a in wanted}
    have = set()
    for a in ipr.get_addr(index=idx):
        iface = ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
        if not (iface.version == 6 and iface.ip.is_link_local):
            have.add(iface)
    changes = []
    for a in sorted(want - have, key=str):
        changes.append(f"{name} add address {a}")
        if not dry:
            ipr.addr("add", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
    for a in sorted(have - want, key=str):
        changes.append(f"{name} remove address {a}")
        if not dry:
            ipr.addr("del", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
    return changes


def _our_routes(ipr: IPRoute, table: int) -> dict[str, Any]:
    found = {}
    for fam in FAMILIES.values():
        for r in ipr.get_routes(family=fam, table=table):
            if r["proto"] != RTPROT_APPLIANCE or (r.get_attr("RTA_TABLE") or r["table"]) != table:
                continue
            dst = r.get_attr("RTA_DST") or ("0.0.0.0" if fam == socket.AF_INET else "::")
            found[str(ipaddress.ip_network(f"{dst}/{r['dst_len']}"))] = r
    return found


def ensure_routes(ipr: IPRoute, idx: int, table: int, wanted: tuple[str, ...], dry: bool) -> list[str]:
    want = {str(ipaddress.ip_network(w)) for w in wanted}
    have = _our_routes(ipr, table)
    changes = []
    for dst, r in sorted(have.items()):
        if dst not in want or r.get_attr("RTA_OIF") != idx:
            changes.append(f"table {table}: remove route {dst}")
            if not dry:  # delete exactly the route we read (scope and device included)
                ipr.route("del", dst=dst, table=table, proto=RTPROT_APPLIANCE, scope=r["scope"],
                          oif=r.get_attr("RTA_OIF"))
            have.pop(dst)
    for dst in sorted(want - set(have)):
        changes.append(f"table {table}: route {dst} via the tunnel")
        if not dry:
            net = ipaddress.ip_network(dst)
            kw = {"scope": 253} if net.version == 4 else {}  # RT_SCOPE_LINK
            ipr.route("add", dst=dst, oif=idx, table=table, proto=RTPROT_APPLIANCE, **kw)
    return changes


def ensure_rules(ipr: IPRoute, table: int, priority: int, families: set[int], dry: bool) -> list[str]:
    changes = []
    for version, fam in FAMILIES.items():
        have = [r for r in ipr.get_rules(family=fam)
                if (r.get_attr("FRA_TABLE") or r["table"]) == table]
        keep = [r for r in have if r.get_attr("FRA_PRIORITY") == priority and not r["src_len"] and not r["dst_len"]]
        for r in have:
            if version not in families or r not in keep[:1]:
                changes.append(f"remove ipv{version} rule priority {r.get_attr('FRA_PRIORITY')} lookup {table}")
                if not dry:
                    ipr.rule("del", family=fam, table=table, priority=r.get_attr("FRA_PRIORITY"))
        if version in families and not keep:
            changes.append(f"ipv{version} rule priority {priority} lookup {table}")
            if not dry:
                ipr.rule("add", family=fam, table=table, priority=priority)
    return changes
