"""WireGuard device state, compared between what is configured and what is wanted.

Both backends (kernel netlink, wireguard-go UAPI) read into and apply these same structures, so
the diff (and its idempotence) is written once."""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Peer:
    public_key: bytes
    allowed_ips: frozenset[str]
    endpoint: str | None = None  # "ip:port" / "[ip]:port", resolved
    keepalive: int = 0
    preshared_key: bytes = bytes(32)


@dataclass(frozen=True)
class Device:
    private_key: bytes
    listen_port: int
    peers: dict[bytes, Peer] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerChange:
    peer: Peer
    remove: bool = False
    replace_allowed_ips: bool = True


@dataclass(frozen=True)
class DeviceChange:
    private_key: bytes | None = None
    listen_port: int | None = None
    peers: tuple[PeerChange, ...] = ()

    @property
    def empty(self) -> bool:
        return self.private_key is None and self.listen_port is None and not self.peers

    def describe(self) -> list[str]:
        out = []
        if self.private_key is not None:
            out.append("private key")  # never the key itself
        if self.listen_port is not None:
            out.append(f"listen port {self.listen_port}")
        for c in self.peers:
            key = base64.b64encode(c.peer.public_key).decode()[:8]
            out.append(f"{'remove' if c.remove else 'set'} peer {key}…")
        return out


def normalise_ips(ips: list[str] | tuple[str, ...]) -> frozenset[str]:
    return frozenset(str(ipaddress.ip_network(i, strict=False)) for i in ips)


def diff(current: Device | None, wanted: Device) -> DeviceChange:
    """What to send so the device matches `wanted`; empty when it already does."""
    if current is None:
        current = Device(bytes(32), 0, {})
    changes = []
    for key, peer in sorted(wanted.peers.items()):
        have = current.peers.get(key)
        # a configured endpoint is a starting point: once the peer roams, WireGuard's view wins
        endpoint_ok = peer.endpoint is None or (have is not None and have.endpoint is not None)
        if have is None or have.allowed_ips != peer.allowed_ips or have.keepalive != peer.keepalive \
                or have.preshared_key != peer.preshared_key or not endpoint_ok:
            changes.append(PeerChange(peer))
    for key in sorted(set(current.peers) - set(wanted.peers)):
        changes.append(PeerChange(current.peers[key], remove=True))
    return DeviceChange(
        private_key=wanted.private_key if current.private_key != wanted.private_key else None,
        listen_port=wanted.listen_port if current.listen_port != wanted.listen_port else None,
        peers=tuple(changes),
    )
