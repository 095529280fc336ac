"""wireguard-go's configuration protocol (the cross-platform UAPI) over its unix socket."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from .wgstate import Device, DeviceChange, Peer

SOCKET_DIR = Path("/var/run/wireguard")


class UapiError(Exception):
    pass


def socket_path(interface: str, directory: Path = SOCKET_DIR) -> Path:
    return directory / f"{interface}.sock"


def _request(path: Path, text: str, timeout: float = 5.0) -> str:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(text.encode())
            data = b""
            while not data.endswith(b"\n\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        raise UapiError(f"{path}: {e}") from None
    return data.decode()


def _errno(reply: str) -> int:
    for line in reply.splitlines():
        if line.startswith("errno="):
            return int(line.split("=", 1)[1])
    raise UapiError(f"no errno in reply: {reply[:200]!r}")


@dataclass
class _PeerReply:
    public_key: bytes
    allowed_ips: set[str] = field(default_factory=set)
    endpoint: str | None = None
    keepalive: int = 0
    psk: bytes = bytes(32)

    def peer(self) -> Peer:
        return Peer(self.public_key, frozenset(self.allowed_ips), self.endpoint, self.keepalive, self.psk)


def get(path: Path) -> Device:
    reply = _request(path, "get=1\n\n")
    if _errno(reply) != 0:
        raise UapiError(f"get failed: errno {_errno(reply)}")
    private, port = bytes(32), 0
    peers: list[_PeerReply] = []
    for line in reply.splitlines():
        key, _, value = line.partition("=")
        if key == "private_key":
            private = bytes.fromhex(value)
        elif key == "listen_port":
            port = int(value)
        elif key == "public_key":
            peers.append(_PeerReply(bytes.fromhex(value)))
        elif peers and key == "allowed_ip":
            peers[-1].allowed_ips.add(value)
        elif peers and key == "endpoint":
            peers[-1].endpoint = value
        elif peers and key == "persistent_keepalive_interval":
            peers[-1].keepalive = int(value)
        elif peers and key == "preshared_key":
            peers[-1].psk = bytes.fromhex(value)
    return Device(private, port, {p.public_key: p.peer() for p in peers})


def set_device(path: Path, change: DeviceChange) -> None:
    lines = ["set=1"]
    if change.private_key is not None:
        lines.append(f"private_key={change.private_key.hex()}")
    if change.listen_port is not None:
        lines.append(f"listen_port={change.listen_port}")
    for c in change.peers:
        lines.append(f"public_key={c.peer.public_key.hex()}")
        if c.remove:
            lines.append("remove=true")
            continue
        lines.append(f"preshared_key={c.peer.preshared_key.hex()}")
        if c.peer.endpoint:
            lines.append(f"endpoint={c.peer.endpoint}")
        lines.append(f"persistent_keepalive_interval={c.peer.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={ip}" for ip in sorted(c.peer.allowed_ips)]
    reply = _request(path, "\n".join(lines) + "\n\n")
    if _errno(reply) != 0:
        raise UapiError(f"set failed: errno {_errno(reply)}")
