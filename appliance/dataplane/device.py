"""The WireGuard device dataplane.json describes: keys, peers, their endpoints. Shared by the
reconciler (kernel WireGuard, wireguard-go) and the userspace dataplane, which must not pay for
importing pyroute2 at boot: nothing here touches netlink."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import socket

from .config import DataplaneConfig, PeerConfig, read_key, split_endpoint
from .wgstate import Device, Peer, normalise_ips


def _resolve(endpoint: str | None) -> str | None:
    if not endpoint:
        return None
    host, port = split_endpoint(endpoint)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0])
        except OSError:
            return None  # DNS not up yet: the next pass sets it
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def wanted_device(cfg: DataplaneConfig, known_endpoints: dict[bytes, str] | None = None) -> Device:
    """The device dataplane.json describes. Peers without a configured endpoint get the one they
    last roamed to, if known: a restarted wireguard-go can then reach them at once."""
    wg = cfg.wireguard
    known = known_endpoints or {}
    peers = {}
    for p in wg.peers:
        key = _key_bytes(p)
        psk = read_key(p.preshared_key_file) if p.preshared_key_file else bytes(32)
        endpoint = _resolve(p.endpoint) or known.get(key)
        peers[key] = Peer(key, normalise_ips(p.allowed_ips), endpoint, p.persistent_keepalive or 0, psk)
    return Device(read_key(wg.private_key_file), wg.listen_port, peers)


def poke(peers: list[Peer]) -> None:
    """One datagram towards each peer's tunnel address: WireGuard has no session yet, so it starts
    a handshake now instead of waiting for the peer's rekey timer (~15 s)."""
    for peer in peers:
        for net in sorted(peer.allowed_ips)[:1]:
            n = ipaddress.ip_network(net)
            host = next(n.hosts(), n.network_address) if n.num_addresses > 1 else n.network_address
            family = socket.AF_INET if n.version == 4 else socket.AF_INET6
            # no route yet: the peer's own timer will start the handshake instead
            with socket.socket(family, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
                s.sendto(b"", (str(host), 9))


def _key_bytes(p: PeerConfig) -> bytes:
    return base64.b64decode(p.public_key)


