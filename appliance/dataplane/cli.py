"""appliance-dataplane: apply, show or keep applying /etc/appliance/dataplane.json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import uapi
from .config import DEFAULT_CONFIG, ConfigError, DataplaneConfig, load

if TYPE_CHECKING:
    from .reconcile import Result

# pyroute2 is imported only by the commands that use netlink: importing it costs ~2.5 s in a VM
# under TCG, time the userspace dataplane does not spend before its tunnel is up


def _print(res: Result, as_json: bool, prefix: str = "") -> None:
    if as_json:
        print(json.dumps({"changes": res.changes, "errors": res.errors, "waiting": res.waiting,
                          "converged": res.converged}), flush=True)
        return
    for c in res.changes:
        print(f"{prefix}{c}", flush=True)
    for w in res.waiting:
        print(f"waiting: {w}", flush=True)
    for e in res.errors:
        print(f"error: {e}", file=sys.stderr, flush=True)


def _notify(state: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())


def watch(config: Path, interval: float, uapi_dir: Path) -> None:
    """Apply, then again whenever a link appears, disappears or changes state (wireguard-go
    restarted, a NIC re-plugged or flapped: offloads come back), and every `interval` seconds."""
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.netlink.rtnl import RTMGRP_LINK

    from .reconcile import apply

    cfg = load(config)
    endpoints: dict[bytes, str] = {}  # where peers were last seen, for a restarted wireguard-go
    _print(apply(cfg, uapi_dir=uapi_dir, known_endpoints=endpoints), False)
    _notify("READY=1")
    print("watching links", flush=True)
    with IPRoute() as ipr:
        ipr.bind(groups=RTMGRP_LINK)
        while True:
            ready, _, _ = select.select([ipr.fileno()], [], [], interval)
            if ready:
                ipr.get()
                time.sleep(0.1)  # let a burst of link messages settle
                while select.select([ipr.fileno()], [], [], 0)[0]:
                    ipr.get()
            try:
                res = apply(load(config), uapi_dir=uapi_dir, known_endpoints=endpoints)
            except (ConfigError, OSError) as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                continue
            _print(res, False)


def _with_credentials(cfg: DataplaneConfig) -> DataplaneConfig:
    """An unprivileged service reads its keys from systemd credentials (LoadCredential=), not from
    the root-only key files that dataplane.json names."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not creds:
        return cfg
    wg = cfg.wireguard
    key = Path(creds) / "wireguard-private-key"
    peers = tuple(dataclasses.replace(p, preshared_key_file=str(Path(creds) / f"wireguard-psk-{p.name}"))
                  if p.preshared_key_file else p for p in wg.peers)
    return dataclasses.replace(cfg, wireguard=dataclasses.replace(
        wg, private_key_file=str(key) if key.exists() else wg.private_key_file, peers=peers))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="appliance-dataplane", description=__doc__)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--uapi-dir", type=Path, default=uapi.SOCKET_DIR, help=argparse.SUPPRESS)
    sub = ap.add_subparsers(dest="command", required=True)
    p_apply = sub.add_parser("apply", help="converge once and print what changed")
    p_apply.add_argument("--json", action="store_true")
    p_status = sub.add_parser("status", help="print what apply would change; exit 1 unless converged")
    p_status.add_argument("--json", action="store_true")
    p_watch = sub.add_parser("watch", help="apply, then keep applying on link events (the service)")
    p_watch.add_argument("--interval", type=float, default=30.0)
    p_user = sub.add_parser("userspace", help="run the rootless dataplane (wireguard-go + gVisor netstack), "
                                              "unprivileged")
    p_user.add_argument("--netstack", type=Path, help="the appliance-netstack binary")
    p_user.add_argument("--interval", type=float, default=30.0)
    args = ap.parse_args(argv)
    try:
        if args.command == "watch":
            watch(args.config, args.interval, args.uapi_dir)
            return
        if args.command == "userspace":
            from . import userspace  # not on the kernel dataplane's way up

            sys.exit(userspace.run(lambda: _with_credentials(load(args.config)), args.config,
                                   binary=args.netstack or userspace.NETSTACK,
                                   uapi_dir=args.uapi_dir, interval=args.interval, notify=_notify))
        from .reconcile import apply

        res = apply(load(args.config), dry=args.command == "status", uapi_dir=args.uapi_dir)
    except ConfigError as e:
        sys.exit(f"appliance-dataplane: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
    _print(res, args.json)
    if res.errors or (args.command == "status" and not res.converged):
        sys.exit(1)


if __name__ == "__main__":
    main()
