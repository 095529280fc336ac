"""The rootless (userspace) dataplane: no process holds root or CAP_NET_ADMIN in the host namespace.

  outer (the service's unprivileged user, host network namespace)
    microsocks on 127.0.0.1:EGRESS_PORT: opens peers' TCP connections from the host's own sockets
    `unshare --user --map-root-user --net` -> inner, root only inside its own user namespace:
        wireguard-go on wg0, the reconciler's usual pass (keys, peers, addresses, routes),
        nftables for the namespace (ACLs, shields-up, redirect of peers' TCP, masquerade to pasta's
        interface), redsocks on RELAY_PORT, microsocks (SOCKS5 into the tunnel) for local programs
    pasta (Debian passt) joins that namespace: it forwards the WireGuard UDP port and the local
    SOCKS5 port into it, splices the namespace's EGRESS_PORT to the host's, and terminates UDP
    flows leaving the namespace, re-originating them from host sockets; ICMP echo becomes a ping
    from the host; other protocols go nowhere.

Peers' TCP ends in the namespace's kernel (redirect to redsocks) and leaves through the host-side
SOCKS5 proxy, so pasta only splices it between two local sockets. pasta's own TCP path acknowledges
a sender's data only once the far end has, and looks again only when the next segment arrives:
wireguard-go hands over a peer's window in a few bursts, the last one waited for the peer's
retransmission timeout, and uploads ran at 0.002-0.008 Gbit/s (measured, passt 2023-03 to 2026-07).

Any part exiting ends the whole dataplane (exit status 1), and systemd starts it afresh.

wireguard-go's UDP socket lives inside the namespace, so WireGuard traffic crosses pasta. Keeping it
in the host namespace (WG_TUN_FD) does not work with wireguard-go 0.0.20231211: CreateTUNFromFile
looks the interface up by name in its own namespace ("no such device")."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .config import EGRESS_PORT, DataplaneConfig
from .reconcile import apply

NS_IFNAME = "tap0"  # pasta's interface inside the namespace
NFT_USERSPACE = Path("/etc/appliance/userspace-nftables.conf")
RELAY_CONFIG = Path("/etc/appliance/redsocks.conf")


def _wait(path: Path, timeout: float) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def inner(cfg: DataplaneConfig, ruleset: Path, relay_config: Path, ready_fd: int) -> int:
    """Inside the namespace: bring up the tunnel, then hold the namespace until a part exits."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    wg = subprocess.Popen(["wireguard-go", "-f", cfg.wireguard.interface], env={**os.environ, "LOG_LEVEL": "error"})
    _wait(Path("/var/run/wireguard") / f"{cfg.wireguard.interface}.sock", 10)
    tunnel = dataclasses.replace(cfg, mode="kernel", links=(), sysctl={"net.ipv4.ip_forward": "1"},
                                 wireguard=dataclasses.replace(cfg.wireguard, implementation="wireguard-go"))
    res = apply(tunnel)
    for e in res.errors:
        print(f"error: {e}", file=sys.stderr, flush=True)
    subprocess.run(["nft", "-f", str(ruleset)], check=True)
    parts = [wg, subprocess.Popen(["redsocks", "-c", str(relay_config)])]
    if cfg.socks5:
        port = cfg.socks5.rsplit(":", 1)[1]
        parts.append(subprocess.Popen(["microsocks", "-i", "0.0.0.0", "-p", port]))
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    return _supervise(parts)


def outer(cfg: DataplaneConfig, config_path: Path, ruleset: Path, relay_config: Path) -> int:
    egress = subprocess.Popen(["microsocks", "-i", "127.0.0.1", "-p", str(EGRESS_PORT)])
    r, w = os.pipe()
    # the inner half is this same package run anew: wherever it was loaded from (the image keeps it
    # in /usr/lib/appliance/python, which only the launcher puts on sys.path)
    home = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")]))}
    inner_proc = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--net", "--", sys.executable, "-m", "appliance.dataplane",
         "--config", str(config_path), "userspace-inner", "--ready-fd", str(w), "--ruleset", str(ruleset),
         "--relay-config", str(relay_config)],
        pass_fds=[w], env=env)
    os.close(w)
    with os.fdopen(r) as ready:
        if ready.readline().strip() != "ready":
            inner_proc.wait()
            egress.terminate()
            print("error: the namespace did not come up", file=sys.stderr, flush=True)
            return 1
    pid = inner_proc.pid
    # --no-map-gw: the gateway's address is a real destination (an exit node reaches everything),
    # not pasta's alias for the host itself
    cmd = ["pasta", "--config-net", "--foreground", "--quiet", "--no-map-gw", "--ns-ifname", NS_IFNAME,
           "--netns", f"/proc/{pid}/ns/net", "--userns", f"/proc/{pid}/ns/user",
           "-u", str(cfg.wireguard.listen_port), "-T", str(EGRESS_PORT), "-U", "none"]
    if cfg.socks5:
        host, port = cfg.socks5.rsplit(":", 1)
        cmd += ["-t", f"{host.strip('[]')}/{port}"]
    else:
        cmd += ["-t", "none"]
    pasta = subprocess.Popen(cmd)
    print(f"userspace dataplane up: wireguard-go in namespace {pid}, pasta {pasta.pid}", flush=True)
    return _supervise([inner_proc, pasta, egress])


def _supervise(parts: list[subprocess.Popen[bytes]]) -> int:
    """Wait until any part exits (or SIGTERM), then stop the others."""
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stop and all(p.poll() is None for p in parts):
        time.sleep(0.2)
    for p in parts:
        if p.poll() is None:
            p.terminate()
    for p in parts:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
    return 0 if stop else 1
