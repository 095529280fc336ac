"""Kernel WireGuard over generic netlink, with pyroute2's message definitions.

pyroute2 0.7.7 (Debian trixie) numbers the peer flags by bit position instead of value and marks new
peers "update only", so its WireGuard.set() cannot be trusted to add peers; the messages are built
here with the kernel's flag values (include/uapi/linux/wireguard.h)."""

from __future__ import annotations

import base64
import socket
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.generic.wireguard import WG_CMD_SET_DEVICE, WG_GENL_VERSION, WireGuard, wgmsg

from .config import split_endpoint
from .wgstate import Device, DeviceChange, Peer

WGPEER_F_REMOVE_ME = 1 << 0
WGPEER_F_REPLACE_ALLOWEDIPS = 1 << 1


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    value = msg.get_attr(name)
    return default if value is None else value


def get(interface: str) -> Device:
    with WireGuard() as wg:
        msgs = wg.info(interface)
    private, port = bytes(32), 0
    peers: dict[bytes, Peer] = {}
    for msg in msgs:  # large devices come in several messages
        key = _attr(msg, "WGDEVICE_A_PRIVATE_KEY")
        if key:
            private = base64.b64decode(key)
        port = _attr(msg, "WGDEVICE_A_LISTEN_PORT", port)
        for p in _attr(msg, "WGDEVICE_A_PEERS", []):
            pub = base64.b64decode(p.get_attr("WGPEER_A_PUBLIC_KEY"))
            ips = {a["addr"] for a in (p.get_attr("WGPEER_A_ALLOWEDIPS") or []) if "addr" in a}
            ep = p.get_attr("WGPEER_A_ENDPOINT")
            endpoint = None
            if ep and ep.get("port"):
                endpoint = f"[{ep['addr']}]:{ep['port']}" if ":" in ep["addr"] else f"{ep['addr']}:{ep['port']}"
            psk = p.get_attr("WGPEER_A_PRESHARED_KEY")
            old = peers.get(pub)
            peers[pub] = Peer(pub, frozenset(ips | (set(old.allowed_ips) if old else set())), endpoint,
                              p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0,
                              base64.b64decode(psk) if psk else bytes(32))
    return Device(private, port, peers)


def _allowed_ips(ips: frozenset[str]) -> list[dict[str, Any]]:
    out = []
    for ip in sorted(ips):
        addr, _, mask = ip.partition("/")
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        packed = socket.inet_pton(family, addr)
        out.append({"attrs": [["WGALLOWEDIP_A_FAMILY", family],
                              ["WGALLOWEDIP_A_IPADDR", packed],
                              ["WGALLOWEDIP_A_CIDR_MASK", int(mask)]]})
    return out


def _peer_attrs(peer: Peer, remove: bool) -> dict[str, Any]:
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", _b64(peer.public_key)]]
    if remove:
        attrs.append(["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME])
        return {"attrs": attrs}
    attrs.append(["WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS])
    attrs.append(["WGPEER_A_PRESHARED_KEY", _b64(peer.preshared_key)])
    attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", peer.keepalive])
    if peer.endpoint:
        host, port = split_endpoint(peer.endpoint)
        attrs.append(["WGPEER_A_ENDPOINT", {"addr": host, "port": port}])
    attrs.append(["WGPEER_A_ALLOWEDIPS", _allowed_ips(peer.allowed_ips)])
    return {"attrs": attrs}


def set_device(interface: str, change: DeviceChange) -> None:
    msg = wgmsg()
    msg["cmd"] = WG_CMD_SET_DEVICE
    msg["version"] = WG_GENL_VERSION
    msg["attrs"].append(["WGDEVICE_A_IFNAME", interface])
    if change.private_key is not None:
        msg["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", _b64(change.private_key)])
    if change.listen_port is not None:
        msg["attrs"].append(["WGDEVICE_A_LISTEN_PORT", change.listen_port])
    if change.peers:
        msg["attrs"].append(["WGDEVICE_A_PEERS", [_peer_attrs(c.peer, c.remove) for c in change.peers]])
    with WireGuard() as wg:
        wg.nlm_request(msg, msg_type=wg.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)
