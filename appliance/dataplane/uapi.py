"""wireguard-go's configuration protocol (the cross-platform UAPI) over its unix socket."""

from __future__ import annotations

import socket
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


def get(path: Path) -> Device:
    reply = _request(path, "get=1\n\n")
    if _errno(reply) != 0:
        raise UapiError(f"get failed: errno {_errno(reply)}")
    private, port = bytes(32), 0
    peers: dict[bytes, Peer] = {}
    cur: dict[str, object] | None = None

    def close() -> None:
        if cur is not None:
            key = cur["public_key"]
            assert isinstance(key, bytes)
            peers[key] = Peer(key, frozenset(cur["allowed_ips"]), cur.get("endpoint"),  # type: ignore[arg-type]
                              int(cur.get("keepalive", 0)), cur.get("psk", bytes(32)))  # type: ignore[arg-type]

    for line in reply.splitlines():
        key, _, value = line.partition("=")
        if key == "private_key":
            private = bytes.fromhex(value)
        elif key == "listen_port":
            port = int(value)
        elif key == "public_key":
            close()
            cur = {"public_key": bytes.fromhex(value), "allowed_ips": set()}
        elif cur is not None and key == "allowed_ip":
            cur["allowed_ips"].add(value)  # type: ignore[attr-defined]
        elif cur is not None and key == "endpoint":
            cur["endpoint"] = value
        elif cur is not None and key == "persistent_keepalive_interval":
            cur["keepalive"] = int(value)
        elif cur is not None and key == "preshared_key":
            cur["psk"] = bytes.fromhex(value)
    close()
    return Device(private, port, peers)


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
