"""Traffic probes for lab tests, run inside namespaces as `python3 probe.py ...`.

  probe.py serve PORT LOG   TCP and UDP echo on PORT; appends {"proto", "src"} per arrival to LOG
  probe.py tcp HOST PORT    connect, send, expect the echo; exit 0 on success
  probe.py udp HOST PORT    send a datagram, expect the echo within 3 s
  probe.py raw HOST PROTO N send N raw IP packets of protocol PROTO (132 SCTP, 47 GRE)

Arrivals of non-TCP/UDP protocols are counted at the far end with nftables counters instead."""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys


def serve(port: int, log: str) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("0.0.0.0", port))
    tcp.listen(16)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", port))
    sel = selectors.DefaultSelector()
    sel.register(tcp, selectors.EVENT_READ)
    sel.register(udp, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.fileobj is tcp:
                conn, addr = tcp.accept()
                conn.settimeout(5)
                data = conn.recv(65536)
                conn.sendall(data)
                conn.close()
                proto = "tcp"
            else:
                data, addr = udp.recvfrom(65536)
                udp.sendto(data, addr)
                proto = "udp"
            with open(log, "a") as f:
                f.write(json.dumps({"proto": proto, "src": addr[0]}) + "\n")


def tcp(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"appliance-probe")
        assert s.recv(100) == b"appliance-probe"


def udp(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(b"appliance-probe", (host, port))
        assert s.recvfrom(100)[0] == b"appliance-probe"


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def sctp_init() -> bytes:
    """A well-formed SCTP INIT (valid CRC32c), so conntrack on the way sees a new association."""
    chunk = struct.pack("!BBHIIHHI", 1, 0, 20, 0x12345678, 65535, 1, 1, 1)
    header = struct.pack("!HHII", 40000, 9, 0, 0)
    checksum = crc32c(header + chunk)
    return header[:8] + struct.pack("<I", checksum) + chunk


def raw(host: str, proto: int, n: int) -> None:
    payloads = {
        132: sctp_init(),
        47: struct.pack("!HH", 0, 0x0800) + b"\x45" + b"\0" * 27,  # GRE carrying a stub IPv4 header
    }
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, proto) as s:
        for _ in range(n):
            s.sendto(payloads[proto], (host, 0))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "serve":
        serve(int(args[0]), args[1])
    elif cmd == "tcp":
        tcp(args[0], int(args[1]))
    elif cmd == "udp":
        udp(args[0], int(args[1]))
    elif cmd == "raw":
        raw(args[0], int(args[1]), int(args[2]))
    else:
        sys.exit(f"unknown command {cmd}")
