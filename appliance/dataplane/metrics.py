"""appliance-dataplane metrics: the appliance's state in Prometheus' text format, on the addresses the
profile names (metrics.listen_on), served from the sockets systemd hands over (appliance-metrics.socket:
nothing runs until the first scrape, nothing listens anywhere else).

Debian has no WireGuard exporter; prometheus-node-exporter knows nothing of WireGuard peers. What is
here is small: `wg show IFACE dump` (the kernel's WireGuard, wireguard-go's and the userspace
dataplane's UAPI socket alike), `ethtool -k` on the uplink, and whether the firewall and the dataplane
are up. The first line of the dump holds the private key: it is never kept, logged or served."""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_CONFIG, DataplaneConfig, Mode, load

SD_LISTEN_FDS_START = 3
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class PeerStats:
    public_key: str
    latest_handshake: int  # unix time; 0: never
    rx_bytes: int
    tx_bytes: int
    interface: str = ""  # from `wg show all dump`


def parse_dump(text: str) -> list[PeerStats]:
    """Peers from `wg show IFACE dump` or `wg show all dump` (each line led by its interface): the
    interfaces' own lines (with the private key) are skipped."""
    peers = []
    for line in text.splitlines():
        f = line.split("\t")
        interface, f = (f[0], f[1:]) if len(f) in (5, 9) else ("", f)
        if len(f) == 8:
            peers.append(PeerStats(f[0], int(f[4]), int(f[5]), int(f[6]), interface))
    return peers


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10)


def _metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> Iterator[str]:
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} {kind}"
    for labels, value in samples:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        yield f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}"


def _uplink_features(cfg: DataplaneConfig) -> list[tuple[dict[str, str], float]]:
    links = json.loads(_run(["ip", "-j", "link", "show"]).stdout or "[]")
    samples: list[tuple[dict[str, str], float]] = []
    for want in cfg.links:
        for link in links:
            name = link.get("ifname", "")
            if want.matches(link):
                features = _run(["ethtool", "-k", name]).stdout
                for feature in want.offload:
                    on = f"{feature}: on" in features
                    samples.append(({"link": want.role, "ifname": name, "feature": feature}, 1.0 if on else 0.0))
    return samples


def collect(cfg: DataplaneConfig, run: Callable[[list[str]], subprocess.CompletedProcess[str]] = _run) -> str:
    names = {p.public_key: p.name for p in cfg.wireguard.peers}
    dump = run(["wg", "show", cfg.wireguard.interface, "dump"])
    peers = parse_dump(dump.stdout) if dump.returncode == 0 else []
    unit = "appliance-userspace.service" if cfg.mode == Mode.USERSPACE else "appliance-dataplane.service"
    lines = [
        *_metric("appliance_info", "gauge", "the appliance and its dataplane",
                 [({"name": cfg.name, "mode": cfg.mode.value, "implementation": cfg.wireguard.implementation.value},
                   1)]),
        *_metric("appliance_firewall_loaded", "gauge", "whether the appliance's nftables table is in the kernel",
                 [({}, 1 if run(["nft", "list", "table", *cfg.firewall_table.split()]).returncode == 0 else 0)]),
        *_metric("appliance_dataplane_up", "gauge", "whether the dataplane's service is active",
                 [({"unit": unit}, 1 if run(["systemctl", "is-active", "--quiet", unit]).returncode == 0 else 0)]),
        *_metric("appliance_tunnel_up", "gauge", "whether the WireGuard device answers",
                 [({"interface": cfg.wireguard.interface}, 1 if dump.returncode == 0 else 0)]),
        *_metric("wireguard_peer_last_handshake_timestamp_seconds", "gauge",
                 "when the peer last completed a handshake (unix time; 0: never)",
                 [({"peer": names.get(p.public_key, ""), "public_key": p.public_key}, p.latest_handshake)
                  for p in peers]),
        *_metric("wireguard_peer_received_bytes_total", "counter", "bytes received from the peer",
                 [({"peer": names.get(p.public_key, ""), "public_key": p.public_key}, p.rx_bytes) for p in peers]),
        *_metric("wireguard_peer_sent_bytes_total", "counter", "bytes sent to the peer",
                 [({"peer": names.get(p.public_key, ""), "public_key": p.public_key}, p.tx_bytes) for p in peers]),
        *_metric("appliance_link_offload_enabled", "gauge", "NIC offloads the profile sets, as the NIC reports them",
                 _uplink_features(cfg)),
    ]
    return "\n".join(lines) + "\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    config: Path = DEFAULT_CONFIG

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = collect(load(self.config)).encode()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # one line per scrape is noise
        pass


def listening_sockets() -> list[socket.socket]:
    """The sockets systemd passed (sd_listen_fds), for this process only."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    return [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]


def serve(config: Path, sockets: list[socket.socket]) -> None:
    """Serve every socket until stopped (one thread each)."""
    handler = type("Handler", (_Handler,), {"config": config})
    servers = []
    for sock in sockets:
        server = socketserver.ThreadingTCPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    while True:
        time.sleep(3600)
