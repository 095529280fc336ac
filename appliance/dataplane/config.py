"""dataplane.json (rendered by appliance) as typed, read-only data."""

from __future__ import annotations

import base64
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("/etc/appliance/dataplane.json")
SCHEMA = 1
# marks the tunnel's routes as the appliance's (unassigned in /etc/iproute2/rt_protos); networkd's
# rendered routes for the kernel's WireGuard carry it too
RTPROT_APPLIANCE = 52


def rule_families(routes: Iterable[str], addresses: Iterable[str]) -> set[int]:
    """The IP versions the policy rule is needed for: those of the peers' routes and the tunnel's
    addresses (the reconciler's rules, and networkd's as the renderer writes them)."""
    return {ipaddress.ip_network(r).version for r in routes} | {ipaddress.ip_interface(a).version for a in addresses}


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class PeerConfig:
    name: str
    public_key: str  # base64
    allowed_ips: tuple[str, ...]
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    preshared_key_file: str | None = None


@dataclass(frozen=True)
class WireGuardConfig:
    implementation: str  # kernel | wireguard-go
    interface: str
    listen_port: int
    mtu: int
    addresses: tuple[str, ...]
    private_key_file: str
    peers: tuple[PeerConfig, ...]


@dataclass(frozen=True)
class LinkConfig:
    role: str
    match_name: str | None
    match_mac: str | None
    offload: dict[str, bool]


@dataclass(frozen=True)
class DataplaneConfig:
    name: str
    mode: str  # kernel | userspace
    wireguard: WireGuardConfig
    table: int
    rule_priority: int
    routes: tuple[str, ...]  # destinations routed to the WireGuard interface in `table`
    links: tuple[LinkConfig, ...]
    sysctl: dict[str, str] = field(default_factory=dict)
    socks5: str | None = None
    firewall_table: str | None = None  # "inet appliance": `watch` brings nothing up before it is loaded


def load(path: Path = DEFAULT_CONFIG) -> DataplaneConfig:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    try:
        return parse(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: not a dataplane config this version understands ({e!r})") from None


def parse(raw: dict[str, Any]) -> DataplaneConfig:
    if raw.get("schema") != SCHEMA:
        raise ValueError(f"schema {raw.get('schema')!r}, expected {SCHEMA}")
    wg = raw["wireguard"]
    peers = tuple(PeerConfig(p["name"], p["public_key"], tuple(p["allowed_ips"]), p.get("endpoint"),
                             p.get("persistent_keepalive"), p.get("preshared_key_file")) for p in wg["peers"])
    wireguard = WireGuardConfig(wg["implementation"], wg["interface"], int(wg["listen_port"]), int(wg["mtu"]),
                                tuple(wg["addresses"]), wg["private_key_file"], peers)
    links = tuple(LinkConfig(role, v["match"].get("name"), v["match"].get("mac"), dict(v["offload"]))
                  for role, v in sorted(raw["interfaces"].items()))
    routing = raw["routing"]
    return DataplaneConfig(raw["name"], raw["mode"], wireguard, int(routing["table"]), int(routing["rule_priority"]),
                           tuple(r["destination"] for r in routing["routes"]), links, dict(raw.get("sysctl", {})),
                           raw.get("socks5"), raw.get("firewall", {}).get("table"))


def read_key(path: str) -> bytes:
    """A base64 key file (private or preshared key) as its 32 raw bytes."""
    try:
        raw = base64.b64decode(Path(path).read_text().strip(), validate=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read key {path}: {e}") from None
    if len(raw) != 32:
        raise ConfigError(f"{path} is not a 32-byte WireGuard key")
    return raw
