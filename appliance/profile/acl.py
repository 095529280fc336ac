"""ACL destinations: "CIDR[:ports]" strings such as "192.168.10.0/24:22,443" or "[fd00::/64]:8000-8100"."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from .types import IPNetwork, parse_network

PortRange = tuple[int, int]


@dataclass(frozen=True)
class AclTarget:
    network: IPNetwork
    ports: tuple[PortRange, ...] = ()  # empty: every port

    def __str__(self) -> str:
        net = f"[{self.network}]" if self.network.version == 6 and self.ports else str(self.network)
        if not self.ports:
            return net
        return f"{net}:{','.join(_port_text(p) for p in self.ports)}"

    def nft_ports(self) -> str:
        """The port set as nftables writes it: { 22, 443, 8000-8100 }."""
        return "{ " + ", ".join(_port_text(p) for p in self.ports) + " }"


def _port_text(p: PortRange) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}-{p[1]}"


def _parse_ports(text: str) -> tuple[PortRange, ...]:
    if text in ("*", ""):
        return ()
    ranges: list[PortRange] = []
    for part in text.split(","):
        part = part.strip()
        lo_s, _, hi_s = part.partition("-")
        if not lo_s.isdigit() or (hi_s and not hi_s.isdigit()):
            raise ValueError(f"'{part}' is not a port or a port range such as 22 or 8000-8100")
        lo, hi = int(lo_s), int(hi_s or lo_s)
        for p in (lo, hi):
            if not 1 <= p <= 65535:
                raise ValueError(f"port {p} is out of range 1-65535")
        if lo > hi:
            raise ValueError(f"port range {part} runs backwards")
        ranges.append((lo, hi))
    return tuple(sorted(set(ranges)))


def _host_network(addr: str) -> IPNetwork:
    ip = ipaddress.ip_address(addr)
    return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")


def parse_acl_target(value: Any) -> AclTarget:
    if isinstance(value, AclTarget):
        return value
    if not isinstance(value, str):
        raise ValueError("expected 'CIDR[:ports]' such as 192.168.10.0/24:22,443")
    text = value.strip()
    ports = ""
    try:
        if text.startswith("["):  # [v6 or v6/len]:ports
            inner, _, rest = text[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ValueError
            ports = rest[1:]
            net = parse_network(inner) if "/" in inner else _host_network(inner)
        elif "/" in text:
            addr, _, tail = text.partition("/")
            plen, _, ports = tail.partition(":")
            net = parse_network(f"{addr}/{plen}")
        elif text.count(":") > 1:  # a bare IPv6 address, no ports
            net = _host_network(text)
        else:
            addr, _, ports = text.partition(":")
            net = _host_network(addr)
    except ValueError as e:
        detail = f" ({e})" if str(e) else ""
        raise ValueError(
            "expected 'CIDR[:ports]' such as 192.168.10.0/24:22,443 or [fd00::/64]:443" + detail
        ) from None
    return AclTarget(net, _parse_ports(ports))


AclDestination = Annotated[
    AclTarget,
    PlainValidator(parse_acl_target),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({
        "type": "string",
        "description": "destination network with optional ports: CIDR[:port,port-range]",
        "examples": ["192.168.10.0/24:22,443", "0.0.0.0/0", "[fd00::/64]:443"],
    }),
]
