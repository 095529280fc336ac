"""appliance-dataplane health: is this boot of the appliance healthy, as its profile defines it?

Run once per boot by appliance-health.service, ordered before boot-complete.target (which it is
required by): with systemd-boot's boot counting a boot is blessed only when this passes. Checks,
retried until they all pass or the grace time is over:
  firewall   the appliance's nftables table is in the kernel
  uplink     the uplink NIC is up, has a global address and (when the profile gives it one) a default route
  tunnel     the WireGuard device answers (kernel, wireguard-go or the userspace dataplane's UAPI
             socket), listens on the profile's port and has exactly the profile's peers
  ssh        sshd answers on the profile's port with an SSH banner
  handshake  (health.handshake_with) one of the named peers completed a handshake within `within` s
The verdict and each problem are logged and kept in $STATE_DIRECTORY/health.json, for `appliance
status` and for whoever looks after a rollback. Standard library only (the image's python3)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .config import DataplaneConfig, LinkConfig

HEALTH_CONFIG = Path("/etc/appliance/health.json")
STATE_FILE = "health.json"
LAST_UNHEALTHY = "last-unhealthy.json"

Run = Callable[[list[str]], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class HealthConfig:
    """/etc/appliance/health.json: what the renderer derives from the profile for this check."""

    ssh_port: int = 22
    grace: int = 120  # seconds the firewall, uplink, tunnel and SSH may take to be up
    default_route: bool = True  # the uplink gets one (DHCP, router advertisements or a gateway)
    handshake_with: tuple[str, ...] = ()  # peer names: one of them must complete a handshake
    within: int = 60  # seconds for that handshake

    def to_json(self) -> dict[str, Any]:
        return {"ssh_port": self.ssh_port, "grace": self.grace, "default_route": self.default_route,
                "handshake_with": list(self.handshake_with), "within": self.within}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> HealthConfig:
        return cls(int(raw["ssh_port"]), int(raw["grace"]), bool(raw["default_route"]),
                   tuple(map(str, raw["handshake_with"])), int(raw["within"]))


@dataclass
class Verdict:
    healthy: bool
    problems: dict[str, str] = field(default_factory=dict)  # check -> what is wrong
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "problems": self.problems, "seconds": round(self.seconds, 1)}


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10)


def _json(run: Run, cmd: list[str]) -> list[dict[str, Any]]:
    out = run(cmd)
    return list(json.loads(out.stdout or "[]")) if out.returncode == 0 else []


def check_firewall(cfg: DataplaneConfig, run: Run) -> str:
    if run(["nft", "list", "table", *cfg.firewall_table.split()]).returncode != 0:
        return f"table {cfg.firewall_table} is not loaded"
    return ""


def check_uplink(uplink: LinkConfig, default_route: bool, run: Run) -> str:
    link = next((x for x in _json(run, ["ip", "-j", "link", "show"]) if uplink.matches(x)), None)
    if link is None:
        return "no NIC matches the uplink"
    name = link["ifname"]
    if "UP" not in link.get("flags", []) or "LOWER_UP" not in link.get("flags", []):
        return f"{name} is down (no carrier or not brought up)"
    addresses = [a for x in _json(run, ["ip", "-j", "addr", "show", "dev", name, "scope", "global"])
                 for a in x.get("addr_info", []) if "local" in a]
    if not addresses:
        return f"{name} has no global address"
    routes = [*_json(run, ["ip", "-j", "-4", "route", "show", "default"]),
              *_json(run, ["ip", "-j", "-6", "route", "show", "default"])]
    if default_route and not any(r.get("dev") == name for r in routes):
        return f"{name} has no default route"
    return ""


def check_tunnel(cfg: DataplaneConfig, run: Run) -> str:
    wg = cfg.wireguard
    dump = run(["wg", "show", wg.interface, "dump"])
    if dump.returncode != 0:
        return f"the WireGuard device {wg.interface} does not answer"
    lines = dump.stdout.splitlines()
    # the first line is the interface's: private key, public key, listen port, fwmark (the key is never kept)
    port = lines[0].split("\t")[2] if lines and len(lines[0].split("\t")) > 2 else ""
    if port != str(wg.listen_port):
        return f"{wg.interface} listens on port {port or 'none'}, not {wg.listen_port}"
    have = {line.split("\t")[0] for line in lines[1:] if line}
    want = {p.public_key for p in wg.peers}
    if have != want:
        names = {p.public_key: p.name for p in wg.peers}
        missing = sorted(names[k] for k in want - have)
        return f"{wg.interface} peers differ from the profile's: missing {missing}, {len(have - want)} unknown"
    return ""


def check_ssh(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            if s.recv(8).startswith(b"SSH-"):
                return ""
            return f"port {port} answers, but not with an SSH banner"
    except OSError as e:
        return f"sshd does not answer on port {port} ({e.strerror or e})"


def check_handshake(cfg: DataplaneConfig, names: tuple[str, ...], run: Run) -> str:
    keys = {p.public_key: p.name for p in cfg.wireguard.peers if p.name in names}
    out = run(["wg", "show", cfg.wireguard.interface, "latest-handshakes"])
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        key, _, when = line.partition("\t")
        if key in keys and when.strip().isdigit() and int(when) > 0:
            return ""
    return f"no handshake yet with {', '.join(sorted(names))}"


def evaluate(cfg: DataplaneConfig, h: HealthConfig, run: Run = _run) -> dict[str, str]:
    """The checks that do not pass, each with what is wrong."""
    uplink = next((x for x in cfg.links if x.role == "uplink"), None)
    problems = {
        "firewall": check_firewall(cfg, run),
        "uplink": check_uplink(uplink, h.default_route, run) if uplink else "",
        "tunnel": check_tunnel(cfg, run),
        "ssh": check_ssh(h.ssh_port),
    }
    if h.handshake_with:
        problems["handshake"] = check_handshake(cfg, h.handshake_with, run)
    return {k: v for k, v in problems.items() if v}


def wait_healthy(cfg: DataplaneConfig, h: HealthConfig, *, run: Run = _run, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = print) -> Verdict:
    """Retry the checks until they all pass or the time is over (the larger of grace and, with
    handshake_with, within)."""
    start = clock()
    deadline = max(h.grace, h.within if h.handshake_with else 0)
    reported: dict[str, str] = {}
    while True:
        elapsed = clock() - start
        problems = evaluate(cfg, h, run)
        if not problems:
            return Verdict(True, {}, elapsed)
        if elapsed >= deadline:
            return Verdict(False, problems, elapsed)
        if problems != reported:  # progress in the journal, once per change
            say(f"waiting ({elapsed:.0f} s): " + "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())))
            reported = problems
        time.sleep(interval)


def record(verdict: Verdict, state_dir: Path) -> Path:
    """health.json in the state directory, replaced whole (a reader never sees half of it)."""
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    data = {**verdict.to_json(), "checked_at": int(time.time()),
            "boot_id": boot_id.read_text().strip() if boot_id.exists() else ""}
    state_dir.mkdir(parents=True, exist_ok=True)
    target = state_dir / STATE_FILE
    atomic_write(target, json.dumps(data, sort_keys=True) + "\n")
    if not verdict.healthy:  # kept past the next boot: why a new root was rolled back
        atomic_write(state_dir / LAST_UNHEALTHY, json.dumps(data, sort_keys=True) + "\n")
    return target


def main(cfg: DataplaneConfig, health_config: Path, state_dir: Path | None, grace: int | None) -> int:
    h = HealthConfig.from_json(json.loads(health_config.read_text()))
    if grace is not None:
        h = dataclasses.replace(h, grace=grace)
    verdict = wait_healthy(cfg, h, say=lambda m: print(m, flush=True))
    where = state_dir or Path(os.environ.get("STATE_DIRECTORY", "/var/lib/appliance").split(":")[0])
    record(verdict, where)
    if verdict.healthy:
        print(f"healthy after {verdict.seconds:.1f} s", flush=True)
        return 0
    for check, problem in sorted(verdict.problems.items()):
        print(f"unhealthy: {check}: {problem}", file=sys.stderr, flush=True)
    return 1
