"""dataplane.json, the one definition: the renderer builds a DataplaneConfig and writes to_json();
the reconciler and the userspace dataplane read it back with load()/from_json(); appliance-netstack
(Go, netstack/policy.go) decodes the same JSON with unknown fields refused. Standard library only:
this runs on the device, whose Python has no pydantic. Keys are never in it, only their paths."""

from __future__ import annotations

import base64
import fnmatch
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/appliance/dataplane.json")
SCHEMA = 1
# marks the tunnel's routes as the appliance's (unassigned in /etc/iproute2/rt_protos); networkd's
# rendered routes for the kernel's WireGuard carry it too
RTPROT_APPLIANCE = 52


class Mode(StrEnum):
    KERNEL = "kernel"  # the kernel routes at layer 3
    USERSPACE = "userspace"  # appliance-netstack: wireguard-go and gVisor's stack, no privileges


class Implementation(StrEnum):
    KERNEL = "kernel"  # the kernel's WireGuard module
    WIREGUARD_GO = "wireguard-go"  # on a TUN device (kernel mode) or in appliance-netstack (userspace)


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (validated when the profile was loaded) -> (host, port)."""
    host, _, port = endpoint.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def rule_families(routes: Iterable[str], addresses: Iterable[str]) -> set[int]:
    """The IP versions the policy rule is needed for: those of the peers' routes and the tunnel's
    addresses (the reconciler's rules, and networkd's as the renderer writes them)."""
    return {ipaddress.ip_network(r).version for r in routes} | {ipaddress.ip_interface(a).version for a in addresses}


class ConfigError(Exception):
    """dataplane.json cannot be read. The dataplane's own error: it runs apart from the CLI's package."""


@dataclass(frozen=True)
class PeerConfig:
    name: str
    public_key: str  # base64
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    preshared_key_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "public_key": self.public_key, "allowed_ips": list(self.allowed_ips),
                "endpoint": self.endpoint, "persistent_keepalive": self.persistent_keepalive,
                "preshared_key_file": self.preshared_key_file}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PeerConfig:
        return cls(str(raw["name"]), str(raw["public_key"]), tuple(map(str, raw["allowed_ips"])), raw.get("endpoint"),
                   raw.get("persistent_keepalive"), raw.get("preshared_key_file"))


@dataclass(frozen=True)
class WireGuardConfig:
    implementation: Implementation
    interface: str
    listen_port: int
    mtu: int
    addresses: tuple[str, ...]
    private_key_file: str
    peers: tuple[PeerConfig, ...]

    def to_json(self) -> dict[str, Any]:
        return {"implementation": self.implementation.value, "interface": self.interface,
                "listen_port": self.listen_port, "mtu": self.mtu, "addresses": list(self.addresses),
                "private_key_file": self.private_key_file, "peers": [p.to_json() for p in self.peers]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> WireGuardConfig:
        return cls(Implementation(raw["implementation"]), str(raw["interface"]), int(raw["listen_port"]),
                   int(raw["mtu"]), tuple(map(str, raw["addresses"])), str(raw["private_key_file"]),
                   tuple(PeerConfig.from_json(p) for p in raw["peers"]))


@dataclass(frozen=True)
class LinkConfig:
    role: str  # uplink | lan
    match_name: str | None
    match_mac: str | None
    group: int  # the link group networkd sets and nftables matches
    offload: dict[str, bool]  # ethtool feature -> on

    def to_json(self) -> dict[str, Any]:
        match = {k: v for k, v in (("name", self.match_name), ("mac", self.match_mac)) if v is not None}
        return {"match": match, "group": self.group, "offload": dict(self.offload)}

    def matches(self, link: dict[str, Any]) -> bool:
        """Whether a link of `ip -j link show` is this one (by MAC, or by name or glob)."""
        if self.match_mac:
            return str(link.get("address", "")).lower() == self.match_mac.lower()
        return self.match_name is not None and fnmatch.fnmatchcase(str(link.get("ifname", "")), self.match_name)

    @classmethod
    def from_json(cls, role: str, raw: dict[str, Any]) -> LinkConfig:
        return cls(role, raw["match"].get("name"), raw["match"].get("mac"), int(raw["group"]), dict(raw["offload"]))


@dataclass(frozen=True)
class FilterRule:
    """One rule of the forward path from peers (kernel mode's forward_from_peers chain), for the
    userspace stack to apply itself: the first that matches admits."""

    sources: tuple[str, ...]  # empty: any peer
    destination: str
    proto: str  # tcp, udp, icmp, any
    ports: tuple[tuple[int, int], ...] = ()  # (first, last); empty: every port
    excluded: tuple[str, ...] = ()  # destinations left out (firewall.block_local_networks)

    def to_json(self) -> dict[str, Any]:
        rule: dict[str, Any] = {"sources": list(self.sources), "destination": self.destination, "proto": self.proto,
                                "ports": [list(r) for r in self.ports]}
        if self.excluded:
            rule["except"] = list(self.excluded)
        return rule

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FilterRule:
        return cls(tuple(raw["sources"]), str(raw["destination"]), str(raw["proto"]),
                   tuple((int(lo), int(hi)) for lo, hi in raw["ports"]), tuple(raw.get("except", ())))


@dataclass(frozen=True)
class Service:
    """An own service of the appliance that peers reach on its tunnel address (userspace mode)."""

    proto: str
    port: int
    address: str = ""  # where on the host it listens; empty: loopback (127.0.0.1 or ::1, by family)

    def to_json(self) -> dict[str, Any]:
        return {"proto": self.proto, "port": self.port, **({"address": self.address} if self.address else {})}


@dataclass(frozen=True)
class Socks5Auth:
    user: str
    password_credential: str  # its name in the dataplane's $CREDENTIALS_DIRECTORY


@dataclass(frozen=True)
class DataplaneConfig:
    name: str
    mode: Mode
    wireguard: WireGuardConfig
    table: int
    rule_priority: int
    routes: tuple[str, ...]  # destinations routed to the WireGuard interface in `table`
    links: tuple[LinkConfig, ...]
    sysctl: dict[str, str] = field(default_factory=dict)
    firewall_table: str = "inet appliance"  # `watch` brings nothing up before it is loaded
    shields_up: bool = False
    socks5: str | None = None  # userspace mode: where its SOCKS5 proxy listens
    socks5_auth: Socks5Auth | None = None
    filter: tuple[FilterRule, ...] = ()  # userspace mode
    services: tuple[Service, ...] = ()  # userspace mode

    def to_json(self) -> dict[str, Any]:
        wg = self.wireguard
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "name": self.name,
            "mode": self.mode.value,
            "wireguard": wg.to_json(),
            "routing": {"table": self.table, "rule_priority": self.rule_priority,
                        "routes": [{"destination": r, "device": wg.interface} for r in self.routes]},
            "interfaces": {link.role: link.to_json() for link in self.links},
            "sysctl": dict(sorted(self.sysctl.items())),
            "firewall": {"shields_up": self.shields_up, "table": self.firewall_table},
        }
        if self.mode == Mode.USERSPACE:
            out["socks5"] = self.socks5
            if self.socks5_auth is not None:
                out["socks5_auth"] = {"user": self.socks5_auth.user,
                                      "password_credential": self.socks5_auth.password_credential}
            out["filter"] = [r.to_json() for r in self.filter]
            out["services"] = [s.to_json() for s in self.services]
        return out

    def dumps(self) -> str:
        """The file's text, as the renderer writes it."""
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DataplaneConfig:
        if raw.get("schema") != SCHEMA:
            raise ValueError(f"schema {raw.get('schema')!r}, expected {SCHEMA}")
        routing, firewall = raw["routing"], raw["firewall"]
        auth = raw.get("socks5_auth")
        return cls(
            name=str(raw["name"]), mode=Mode(raw["mode"]), wireguard=WireGuardConfig.from_json(raw["wireguard"]),
            table=int(routing["table"]), rule_priority=int(routing["rule_priority"]),
            routes=tuple(str(r["destination"]) for r in routing["routes"]),
            links=tuple(LinkConfig.from_json(role, v) for role, v in sorted(raw["interfaces"].items())),
            sysctl={str(k): str(v) for k, v in raw.get("sysctl", {}).items()},
            firewall_table=str(firewall["table"]), shields_up=bool(firewall["shields_up"]),
            socks5=raw.get("socks5"),
            socks5_auth=Socks5Auth(str(auth["user"]), str(auth["password_credential"])) if auth else None,
            filter=tuple(FilterRule.from_json(r) for r in raw.get("filter", ())),
            services=tuple(Service(str(s["proto"]), int(s["port"]), str(s.get("address", "")))
                           for s in raw.get("services", ())))


def load(path: Path = DEFAULT_CONFIG) -> DataplaneConfig:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    try:
        return DataplaneConfig.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: not a dataplane config this version understands ({e!r})") from None


def parse(raw: dict[str, Any]) -> DataplaneConfig:
    return DataplaneConfig.from_json(raw)


def read_key(path: str) -> bytes:
    """A base64 key file (private or preshared key) as its 32 raw bytes."""
    try:
        raw = base64.b64decode(Path(path).read_text().strip(), validate=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read key {path}: {e}") from None
    if len(raw) != 32:
        raise ConfigError(f"{path} is not a 32-byte WireGuard key")
    return raw
