"""One pass of the reconciler: compare the kernel's state with dataplane.json and converge.

Idempotent by construction: every step reads the current state, computes the difference and sends
only that, so a second pass reports no changes. With dry=True nothing is written (`status`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyroute2.iproute.linux import IPRoute

from . import kernelwg, uapi
from .config import DataplaneConfig, Implementation, Mode, rule_families
from .device import poke, wanted_device
from .hostcfg import ensure_offloads, ensure_sysctls, matching_links
from .links import ensure_addresses, ensure_link, ensure_routes, ensure_rules
from .wgstate import diff


@dataclass
class Result:
    changes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # e.g. wireguard-go not started yet

    @property
    def converged(self) -> bool:
        return not self.changes and not self.errors and not self.waiting


def apply(cfg: DataplaneConfig, *, dry: bool = False, uapi_dir: Path = uapi.SOCKET_DIR,
          known_endpoints: dict[bytes, str] | None = None) -> Result:
    """One pass. known_endpoints (peer key -> last endpoint) is updated in place when given."""
    res = Result()
    changes, errors = ensure_sysctls(cfg.sysctl, dry)
    res.changes += changes
    res.errors += errors
    with IPRoute() as ipr:
        if cfg.mode == Mode.KERNEL:
            _tunnel(ipr, cfg, res, dry, uapi_dir, known_endpoints)
        for link in cfg.links:
            for name in matching_links(ipr, link):
                changes, errors = ensure_offloads(name, link.offload, dry)
                res.changes += changes
                res.errors += errors
    return res


def _tunnel(ipr: IPRoute, cfg: DataplaneConfig, res: Result, dry: bool, uapi_dir: Path,
            known_endpoints: dict[bytes, str] | None) -> None:
    wg = cfg.wireguard
    kernel = wg.implementation == Implementation.KERNEL
    idx, changes = ensure_link(ipr, wg.interface, "wireguard" if kernel else "", wg.mtu, dry)
    res.changes += changes
    if idx is None:
        if not kernel:
            res.waiting.append(f"{wg.interface}: wireguard-go has not created it yet")
        return
    wanted = wanted_device(cfg, known_endpoints)
    if kernel:
        current = kernelwg.get(wg.interface)
    else:
        path = uapi.socket_path(wg.interface, uapi_dir)
        try:
            current = uapi.get(path)
        except uapi.UapiError as e:
            res.waiting.append(f"{wg.interface}: wireguard-go not answering ({e})")
            return
    if known_endpoints is not None:
        known_endpoints.update({k: p.endpoint for k, p in current.peers.items() if p.endpoint})
    change = diff(current, wanted)
    if not change.empty:
        res.changes += [f"{wg.interface} {d}" for d in change.describe()]
        if not dry:
            if kernel:
                kernelwg.set_device(wg.interface, change)
            else:
                uapi.set_device(uapi.socket_path(wg.interface, uapi_dir), change)
    res.changes += ensure_addresses(ipr, idx, wg.interface, wg.addresses, dry)
    res.changes += ensure_routes(ipr, idx, cfg.table, cfg.routes, dry)
    res.changes += ensure_rules(ipr, cfg.table, cfg.rule_priority, rule_families(cfg.routes, wg.addresses), dry)
    restored = [c.peer for c in change.peers if not c.remove and c.peer.endpoint
                and c.peer.public_key not in current.peers]
    if restored and not dry:
        poke(restored)
