"""Traffic probes for lab tests, run inside namespaces as `python3 probe.py ...`.

  probe.py serve PORTS LOG [BIND]  TCP and UDP echo on each of PORTS (comma-separated), on BIND
                            (default: every IPv4 and IPv6 address); appends {"proto", "src", "port"}
                            per arrival to LOG
  probe.py tcp HOST PORT [TIMEOUT]  connect, send, expect the echo; prints the MSS; exit 0 on success
  probe.py socks PROXY HOST PORT [USER:PASSWORD]  through a SOCKS5 proxy (host:port) to the echo
                            server at HOST:PORT, with RFC 1929 authentication when given
  probe.py connect HOST PORT [TIMEOUT]  open a TCP connection to any server; exit 0 if it was accepted
  probe.py udp HOST PORT    send a datagram, expect the echo within 3 s
  probe.py raw HOST PROTO N send N raw IP packets of protocol PROTO (132 SCTP, 47 GRE)
  probe.py http URL          GET it; the body to stdout, exit 0 on 200
  probe.py dns SERVER NAME [TIMEOUT]  an A query (UDP, recursion desired); prints the addresses,
                            exit 0 if there is at least one

Arrivals of non-TCP/UDP protocols are counted at the far end with nftables counters instead."""

from __future__ import annotations

import json
import selectors
import socket
import struct
import sys
import time


def expect(condition: bool, why: str) -> None:
    """A probe's verdict: exit status 1 with the reason when the traffic did not do what it should
    (not `assert`, which `python -O` would drop)."""
    if not condition:
        sys.exit(f"probe: {why}")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve(ports: list[int], log: str, bind: str = "") -> None:
    sel = selectors.DefaultSelector()
    # one socket per family (IPV6_V6ONLY), so an IPv4 source is logged as itself, not as ::ffff:a.b.c.d
    for address in [bind] if bind else ["0.0.0.0", "::"]:
        for port in ports:
            for kind, proto in ((socket.SOCK_STREAM, "tcp"), (socket.SOCK_DGRAM, "udp")):
                sock = socket.socket(_family(address), kind)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if _family(address) == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address, port))
                if proto == "tcp":
                    sock.listen(16)
                sel.register(sock, selectors.EVENT_READ, (proto, port))
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            proto, port = key.data
            ready = key.fileobj
            if not isinstance(ready, socket.socket):
                continue
            try:
                if proto == "tcp":
                    conn, addr = ready.accept()
                    conn.settimeout(5)
                    conn.sendall(conn.recv(65536))
                    conn.close()
                else:
                    data, addr = ready.recvfrom(65536)
                    ready.sendto(data, addr)
            except OSError:
                continue
            with open(log, "a") as f:
                f.write(json.dumps({"proto": proto, "src": addr[0], "port": port}) + "\n")


def tcp(host: str, port: int, timeout: float = 5) -> None:
    with socket.create_connection((host, port), timeout=timeout) as s:
        print(f"mss={s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)}", flush=True)
        s.sendall(b"appliance-probe")
        expect(s.recv(100) == b"appliance-probe", "no echo")


def socks(proxy: str, host: str, port: int, credentials: str = "") -> None:
    """Through a SOCKS5 proxy (no auth, or RFC 1929 user:password) to an echo server at host:port."""
    phost, pport = proxy.rsplit(":", 1)
    with socket.create_connection((phost, int(pport)), timeout=5) as s:
        if credentials:
            user, _, password = credentials.partition(":")
            s.sendall(b"\x05\x01\x02")
            expect(s.recv(2) == b"\x05\x02", "proxy refused username/password authentication")
            s.sendall(b"\x01" + bytes([len(user)]) + user.encode() + bytes([len(password)]) + password.encode())
            expect(s.recv(2) == b"\x01\x00", "proxy refused the credentials")
        else:
            s.sendall(b"\x05\x01\x00")
            expect(s.recv(2) == b"\x05\x00", "proxy refused the greeting")
        address = b"\x04" + socket.inet_pton(socket.AF_INET6, host) if ":" in host else b"\x01" + socket.inet_aton(host)
        s.sendall(b"\x05\x01\x00" + address + struct.pack("!H", port))
        reply = _read(s, 4)
        expect(reply[:2] == b"\x05\x00", f"proxy could not connect: {reply!r}")
        _read(s, {1: 4, 4: 16}.get(reply[3], 0) + 2)  # the proxy's bound address and port
        s.sendall(b"appliance-probe")
        expect(s.recv(100) == b"appliance-probe", "no echo")


def _read(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        expect(bool(chunk), "the proxy closed the connection")
        data += chunk
    return data


def connect(host: str, port: int, timeout: float = 3) -> None:
    with socket.create_connection((host, port), timeout=timeout):
        pass


def udp(host: str, port: int, timeout: float = 3) -> None:
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(b"appliance-probe", (host, port))
        expect(s.recvfrom(100)[0] == b"appliance-probe", "no echo")


def dns(server: str, name: str, timeout: float = 5) -> None:
    """An A query for name, by hand (RFC 1035): a header with RD set, one question; the answer's A
    records printed one per line."""
    qid = int(time.monotonic() * 1000) & 0xFFFF
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".")) + b"\0"
    query = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(_family(server), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(query, (server, 53))
        reply = s.recvfrom(4096)[0]
    rid, flags, qd, an = struct.unpack("!HHHH", reply[:8])
    expect(rid == qid and flags & 0x8000 and flags & 0xF == 0, f"no good answer (flags {flags:#06x})")
    pos = 12
    for _ in range(qd):  # skip the question(s)
        pos = _skip_name(reply, pos) + 4
    found = []
    for _ in range(an):
        pos = _skip_name(reply, pos)
        rtype, _cls, _ttl, length = struct.unpack("!HHIH", reply[pos:pos + 10])
        pos += 10
        if rtype == 1 and length == 4:
            found.append(socket.inet_ntoa(reply[pos:pos + 4]))
        pos += length
    print("\n".join(found), flush=True)
    expect(bool(found), "no A record in the answer")


def _skip_name(msg: bytes, pos: int) -> int:
    while msg[pos]:
        if msg[pos] & 0xC0 == 0xC0:  # a pointer ends the name
            return pos + 2
        pos += msg[pos] + 1
    return pos + 1


def http(url: str, timeout: float = 10) -> None:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as reply:  # noqa: S310 (a lab's own address)
        expect(reply.status == 200, f"HTTP {reply.status}")
        sys.stdout.write(reply.read().decode())


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
    with socket.socket(_family(host), socket.SOCK_RAW, proto) as s:
        for i in range(n):
            if i:
                # a pause between them: packets of one new flow decrypted on several CPUs at once
                # race to create its conntrack entry, and for SCTP and GRE the losers are dropped
                time.sleep(0.05)
            s.sendto(payloads[proto], (host, 0))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "serve":
        serve([int(p) for p in args[0].split(",")], args[1], *args[2:3])
    elif cmd == "tcp":
        tcp(args[0], int(args[1]), *(float(a) for a in args[2:3]))
    elif cmd == "socks":
        socks(args[0], args[1], int(args[2]), *args[3:4])
    elif cmd == "connect":
        connect(args[0], int(args[1]), *(float(a) for a in args[2:3]))
    elif cmd == "udp":
        udp(args[0], int(args[1]), *(float(a) for a in args[2:3]))
    elif cmd == "http":
        http(args[0], *(float(a) for a in args[1:2]))
    elif cmd == "dns":
        dns(args[0], args[1], *(float(a) for a in args[2:3]))
    elif cmd == "raw":
        raw(args[0], int(args[1]), int(args[2]))
    else:
        sys.exit(f"unknown command {cmd}")
