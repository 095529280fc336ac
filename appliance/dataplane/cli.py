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
from typing import TYPE_CHECKING, Any

from . import uapi
from .config import DEFAULT_CONFIG, ConfigError, DataplaneConfig, load
from .health import HEALTH_CONFIG

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


def link_set_changed(msgs: list[Any], known: dict[int, str]) -> bool:
    """Whether rtnetlink link messages add, remove or rename a link (wireguard-go restarted, a NIC
    plugged, renamed into a profile's match, or gone); `known` (ifindex -> name) is updated. Other
    link messages (up/down, carrier, MTU, statistics) change nothing the dataplane sets, and at boot,
    when networkd brings every link up, there are dozens of them."""
    changed = False
    for m in msgs:
        index, name = m["index"], m.get_attr("IFLA_IFNAME")
        if m["event"] == "RTM_DELLINK":
            changed |= known.pop(index, None) is not None
        elif known.get(index) != name:
            known[index] = name
            changed = True
    return changed


def watch(config: Path, interval: float, uapi_dir: Path) -> None:
    """Once the firewall is loaded (dataplane.json names its table), apply; then again whenever a
    link appears, disappears or is renamed (wireguard-go restarted, a NIC re-plugged: its offloads
    come back), and every `interval` seconds."""
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.netlink.rtnl import RTMGRP_LINK

    from .firewall import wait_for_table
    from .reconcile import apply

    cfg = load(config)
    if cfg.firewall_table:
        waited = wait_for_table(cfg.firewall_table, lambda m: print(m, flush=True))
        if waited:
            print(f"firewall loaded after {waited:.1f} s", flush=True)
    endpoints: dict[bytes, str] = {}  # where peers were last seen, for a restarted wireguard-go
    with IPRoute() as ipr:
        ipr.bind(groups=RTMGRP_LINK)
        with IPRoute() as dump:  # a socket of its own: the bound one also carries the events
            known = {m["index"]: m.get_attr("IFLA_IFNAME") for m in dump.get_links()}
        _print(apply(cfg, uapi_dir=uapi_dir, known_endpoints=endpoints), False)
        _notify("READY=1")
        print("watching links", flush=True)
        due = time.monotonic() + interval
        while True:
            ready, _, _ = select.select([ipr.fileno()], [], [], max(0.0, due - time.monotonic()))
            if ready:
                msgs = list(ipr.get())
                time.sleep(0.1)  # let a burst of link messages settle
                while select.select([ipr.fileno()], [], [], 0)[0]:
                    msgs += ipr.get()
                if not link_set_changed(msgs, known) and time.monotonic() < due:
                    continue
            due = time.monotonic() + interval
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
    p_metrics = sub.add_parser("metrics", help="serve Prometheus metrics on the sockets systemd passes "
                                               "(appliance-metrics.socket); --print: once, to stdout")
    p_metrics.add_argument("--print", action="store_true")
    p_health = sub.add_parser("health", help="check this boot's health as the profile defines it (firewall, "
                                             "uplink, tunnel, SSH, handshakes); exit 1 if unhealthy")
    p_health.add_argument("--health-config", type=Path, default=HEALTH_CONFIG)
    p_health.add_argument("--state-dir", type=Path, help="where health.json goes (default: $STATE_DIRECTORY)")
    p_health.add_argument("--grace", type=int, help="seconds to wait for the checks (default: the profile's)")
    p_slot = sub.add_parser("slot", add_help=False, help="the root slots: status, install (updates), fail-boot "
                                                         "(see `slot --help`)")
    p_slot.add_argument("slot_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    try:
        if args.command == "slot":  # needs no dataplane configuration
            from . import slots

            sys.exit(slots.main(args.slot_args))
        if args.command == "watch":
            watch(args.config, args.interval, args.uapi_dir)
            return
        if args.command == "userspace":
            from . import userspace  # not on the kernel dataplane's way up

            sys.exit(userspace.run(lambda: _with_credentials(load(args.config)), args.config,
                                   binary=args.netstack or userspace.NETSTACK,
                                   uapi_dir=args.uapi_dir, interval=args.interval, notify=_notify))
        if args.command == "metrics":
            from . import metrics

            if args.print:
                print(metrics.collect(load(args.config)), end="")
            else:
                metrics.serve(args.config, metrics.listening_sockets())
            return
        if args.command == "health":
            from . import health

            sys.exit(health.main(load(args.config), args.health_config, args.state_dir, args.grace))
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
