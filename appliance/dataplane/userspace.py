"""The rootless (userspace) dataplane, as Tailscale's userspace-networking mode: one unprivileged
process, appliance-netstack (wireguard-go with gVisor's TCP/IP stack in place of a TUN device, see
netstack/main.go). Peers' TCP and UDP end in that stack and leave again from the host's own sockets,
so the host's routes and uplink address apply; ICMP echo is answered by a real ping; other
protocols go nowhere. No process holds root or any capability, and no TUN device or namespace is
needed: WireGuard's UDP socket is an ordinary socket of the host.

This module starts appliance-netstack, gives it its keys and peers over wireguard-go's UAPI socket
(keys never pass through dataplane.json, and peers change without a restart), keeps them converged,
and ends the dataplane (exit status 1, systemd starts it afresh) when the process exits.

An earlier design ran wireguard-go in a user+network namespace behind pasta (Debian passt), with a
TCP relay (redsocks, microsocks) around pasta's TCP path: five processes, every WireGuard datagram
copied through pasta, 0.37 Gbit/s where kernel mode did 2.3 (docs/benchmarks.md)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import uapi
from .atomic import atomic_write
from .config import ConfigError, DataplaneConfig
from .device import wanted_device
from .wgstate import diff

NETSTACK = Path("/usr/lib/appliance/appliance-netstack")
START_TIMEOUT = 10.0
ENDPOINT_POLL = 5.0  # how often peers' endpoints are read back, to be remembered


def converge(cfg: DataplaneConfig, sock: Path, known_endpoints: dict[bytes, str]) -> list[str]:
    """One pass over the device: what changed, described without secrets."""
    current = uapi.get(sock)
    known_endpoints.update({k: p.endpoint for k, p in current.peers.items() if p.endpoint})
    change = diff(current, wanted_device(cfg, known_endpoints))
    if change.empty:
        return []
    # a peer given back its last endpoint gets a handshake from appliance-netstack itself (a kernel
    # socket's datagram, as the reconciler's poke sends, never enters the userspace stack)
    uapi.set_device(sock, change)
    return [f"{cfg.wireguard.interface} {d}" for d in change.describe()]


def _load_endpoints(path: Path | None) -> dict[bytes, str]:
    """Where peers were last seen, kept across restarts (systemd's StateDirectory=): a restarted
    dataplane starts the handshake itself instead of waiting ~15 s for the peer to notice."""
    if path is None:
        return {}
    try:
        raw = json.loads(path.read_text())
        return {base64.b64decode(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _remember_endpoints(sock: Path, endpoints: dict[bytes, str], path: Path | None) -> None:
    seen = {k: p.endpoint for k, p in uapi.get(sock).peers.items() if p.endpoint}
    if path is None or all(endpoints.get(k) == v for k, v in seen.items()):
        return
    endpoints.update(seen)
    atomic_write(path, json.dumps({base64.b64encode(k).decode(): v for k, v in endpoints.items()}))


def _answers(sock: Path) -> bool:
    try:
        uapi.get(sock)
    except uapi.UapiError:
        return False
    return True


def _wait_for_socket(sock: Path, proc: subprocess.Popen[bytes], binary: Path, stopped: Callable[[], bool]
                     ) -> int | None:
    """None once the UAPI socket answers (not only exists: a socket left by a killed predecessor
    refuses connections), else the exit status to end with."""
    t0 = time.monotonic()
    while not _answers(sock):
        if proc.poll() is not None or stopped():
            return 0 if stopped() else 1
        if time.monotonic() - t0 > START_TIMEOUT:
            print(f"error: {binary} opened no UAPI socket {sock} within {START_TIMEOUT:.0f} s", file=sys.stderr,
                  flush=True)
            return 1
        time.sleep(0.02)
    return None


def _keep_converged(load: Callable[[], DataplaneConfig], sock: Path, endpoints: dict[bytes, str], state: Path | None,
                    interval: float, done: Callable[[], bool]) -> None:
    """A full pass every `interval` (DNS names of peers' endpoints resolve once the network is up, a
    changed file applies), peers' endpoints read back in between to be remembered."""
    next_pass = time.monotonic() + interval
    next_look = time.monotonic() + ENDPOINT_POLL
    while not done():
        time.sleep(0.2)
        now = time.monotonic()
        try:
            if now >= next_pass:
                next_pass = now + interval
                for line in converge(load(), sock, endpoints):
                    print(line, flush=True)
            elif now >= next_look:
                next_look = now + ENDPOINT_POLL
                _remember_endpoints(sock, endpoints, state)
        except (ConfigError, uapi.UapiError, OSError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)


def run(load: Callable[[], DataplaneConfig], config_path: Path, *, binary: Path = NETSTACK,
        uapi_dir: Path = uapi.SOCKET_DIR, interval: float = 30.0,
        notify: Callable[[str], None] = lambda state: None) -> int:
    """Run the dataplane until SIGTERM (exit 0) or until appliance-netstack exits (exit 1).
    load() reads dataplane.json again on each pass, so a changed file converges without a restart."""
    cfg = load()
    sock = uapi.socket_path(cfg.wireguard.interface, uapi_dir)
    state = Path(os.environ["STATE_DIRECTORY"]) / "endpoints.json" if os.environ.get("STATE_DIRECTORY") else None
    proc = subprocess.Popen([str(binary), "--config", str(config_path)])
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        started = _wait_for_socket(sock, proc, binary, lambda: stop)
        if started is not None:
            return started
        endpoints = _load_endpoints(state)
        try:
            for line in converge(cfg, sock, endpoints):
                print(line, flush=True)
        except (ConfigError, uapi.UapiError) as e:
            print(f"error: {binary.name} could not be configured: {e}", file=sys.stderr, flush=True)
            return 1
        print(f"userspace dataplane up: {binary.name} pid {proc.pid}", flush=True)
        notify("READY=1")
        _keep_converged(load, sock, endpoints, state, interval, lambda: stop or proc.poll() is not None)
        if not stop:
            print(f"error: {binary.name} exited with status {proc.returncode}", file=sys.stderr, flush=True)
        return 0 if stop else 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
