"""One pass of the reconciler: compare the kernel's state with dataplane.json and converge.

Idempotent by construction: every step reads the current state, computes the difference and sends
only that, so a second pass reports no changes. With dry=True nothing is written (`status`)."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from . import kernelwg, uapi
from .config import DataplaneConfig, PeerConfig, read_key
from .hostcfg import ensure_offloads, ensure_sysctls, matching_links
from .links import ensure_addresses, ensure_link, ensure_routes, ensure_rules
from .wgstate import Device, Peer, diff, normalise_ips


@dataclass
class Result:
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # e.g. wireguard-go not started yet

    @property
    def converged(self) -> bool:
        return not self.changes and not self.errors and not self.waiting


def _resolve(endpoint: str | None) -> str | None:
    if not endpoint:
        return None
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        try:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0][4][0])
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


def _poke(peers: list[Peer]) -> None:
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


def apply(cfg: DataplaneConfig, *, dry: bool = False, uapi_dir: Path = uapi.SOCKET_DIR,
          known_endpoints: dict[bytes, str] | None = None) -> Result:
    """One pass. known_endpoints (peer key -> last endpoint) is updated in place when given."""
    res = Result()
    changes, errors = ensure_sysctls(cfg.sysctl, dry)
    res.changes += changes
    res.errors += errors
    with IPRoute() as ipr:
        if cfg.mode == "kernel":
            _tunnel(ipr, cfg, res, dry, uapi_dir, known_endpoints)
        for link in cfg.links:
            for name in matching_links(ipr, link):
                changes, errors = ensure_offloads(name, link.offload, dry)
                res.changes += changes
                res.errors += errors
    return res


def _tunnel(ipr: IPRoute, cfg: DataplaneConfig, res: Result, dry: bool, uapi_dir: Path,
            known_endpoints: dict[bytes, str] | None) -> None:
    wg = cfg.wireguard
    kernel = wg.implementation == "kernel"
    idx, changes = ensure_link(ipr, wg.interface, "wireguard" if kernel else "", wg.mtu, dry)
    res.changes += changes
    if idx is None:
        if not kernel:
            res.waiting.append(f"{wg.interface}: wireguard-go has not created it yet")
        return
    wanted = wanted_device(cfg, known_endpoints)
    if kernel:
        current = kernelwg.get(wg.interface)
    else:
        path = uapi.socket_path(wg.interface, uapi_dir)
        try:
            current = uapi.get(path)
        except uapi.UapiError as e:
            res.waiting.append(f"{wg.interface}: wireguard-go not answering ({e})")
            return
    if known_endpoints is not None:
        known_endpoints.update({k: p.endpoint for k, p in current.peers.items() if p.endpoint})
    change = diff(current, wanted)
    if not change.empty:
        res.changes += [f"{wg.interface} {d}" for d in change.describe()]
        if not dry:
            if kernel:
                kernelwg.set_device(wg.interface, change)
            else:
                uapi.set_device(uapi.socket_path(wg.interface, uapi_dir), change)
    res.changes += ensure_addresses(ipr, idx, wg.interface, wg.addresses, dry)
    res.changes += ensure_routes(ipr, idx, cfg.table, cfg.routes, dry)
    families: set[int] = {ipaddress.ip_network(r).version for r in cfg.routes} | {
        ipaddress.ip_interface(a).version for a in wg.addresses}
    res.changes += ensure_rules(ipr, cfg.table, cfg.rule_priority, families, dry)
    restored = [c.peer for c in change.peers if not c.remove and c.peer.endpoint
                and c.peer.public_key not in current.peers]
    if restored and not dry:
        _poke(restored)
