"""A lab of network namespaces joined by veth pairs, for tests and `appliance test` to send real packets.

Every namespace, process and directory the lab makes is recorded and removed by close(), which the
fixtures call even when a test fails. Each namespace gets a private /run (wireguard-go puts its
UAPI socket in /var/run/wireguard), so several wireguard-go instances do not collide. Addresses come
from 198.18.0.0/15 (RFC 2544, benchmarking) and exist only inside the lab."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import LabError
from ..runner import CommandFailed, run, spawn

PRIVATE_RUN = 'mount --bind "$0" /run && exec "$@"'
# with extra bind mounts: "$0" is /run's source, then pairs of (source, target) up to "--"
PRIVATE_RUN_BINDS = ('run=$0; while [ "$1" != -- ]; do mount --bind "$1" "$2"; shift 2; done; shift; '
                     'mount --bind "$run" /run && exec "$@"')


class LabCommandFailed(CommandFailed, LabError, AssertionError):
    """A command in a lab namespace failed."""


class LabTimeout(LabError, AssertionError):
    """A lab condition that did not come true in time: an error for the CLI, a failure for pytest."""


class Lab:
    def __init__(self, tag: str = "t"):
        self.prefix = f"apl{tag}{os.getpid() % 100000}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.namespaces: list[str] = []
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def ns(self, short: str) -> str:
        name = f"{self.prefix}-{short}"
        run(["ip", "netns", "add", name], error=LabCommandFailed)
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"], error=LabCommandFailed)
        (self.dir / "run" / name / "wireguard").mkdir(parents=True)
        return name

    def rundir(self, ns: str) -> Path:
        return self.dir / "run" / ns

    def veth(self, a: tuple[str, str, str], b: tuple[str, str, str], mac_a: str | None = None) -> None:
        """Connect (ns, ifname, address/len) a to b and bring both up."""
        (ns_a, if_a, addr_a), (ns_b, if_b, addr_b) = a, b
        cmd = ["ip", "link", "add", if_a, "netns", ns_a]
        if mac_a:
            cmd += ["address", mac_a]
        run([*cmd, "type", "veth", "peer", "name", if_b, "netns", ns_b], error=LabCommandFailed)
        for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
            if addr:
                run(["ip", "-n", ns, "addr", "add", addr, "dev", ifname], error=LabCommandFailed)
            run(["ip", "-n", ns, "link", "set", ifname, "up"], error=LabCommandFailed)

    def _wrap(self, ns: str, cmd: Sequence[str | Path], binds: Sequence[tuple[Path, str]] = ()) -> list[str]:
        head = ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c"]
        if not binds:
            return [*head, PRIVATE_RUN, str(self.rundir(ns)), *[str(c) for c in cmd]]
        pairs = [str(x) for src, dst in binds for x in (src, dst)]
        return [*head, PRIVATE_RUN_BINDS, str(self.rundir(ns)), *pairs, "--", *[str(c) for c in cmd]]

    def run(self, ns: str, cmd: Sequence[str | Path], check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc: subprocess.CompletedProcess[str] = run(self._wrap(ns, cmd), input=input, timeout=timeout, check=False,
                                                     error=LabCommandFailed)
        if check and proc.returncode != 0:
            raise LabCommandFailed(f"[{ns}] {' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                                   f"{proc.stdout}{proc.stderr}", status=proc.returncode)
        return proc

    def spawn(self, ns: str, cmd: Sequence[str | Path], name: str, env: dict[str, str] | None = None,
              binds: Sequence[tuple[Path, str]] = ()) -> subprocess.Popen[bytes]:
        log = self.dir / f"{name}.log"
        with open(log, "ab") as f:
            proc = spawn(self._wrap(ns, cmd, binds), output=f, env=env, new_session=True)
        self.procs.append((proc, log))
        return proc

    def serve(self, ns: str, ports: str, log: Path, name: str, bind: str | None = None) -> subprocess.Popen[bytes]:
        """probe.py's echo server on ports (comma-separated) in ns; returns once it listens."""
        from . import probe

        proc = self.spawn(ns, [sys.executable, probe.__file__, "serve", ports, log, *([bind] if bind else [])], name)
        wait_for(lambda: "ready" in self.log(name) or proc.poll() is not None, 10, 0.05)
        if proc.poll() is not None:
            raise LabError(f"the echo server {name} did not start:\n{self.log(name)}")
        return proc

    def arrivals(self, name: str = "arrivals.jsonl") -> list[dict[str, Any]]:
        """What a `probe.py serve` in this lab has logged as arriving (one JSON object per line)."""
        log = self.dir / name
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def log(self, name: str) -> str:
        p = self.dir / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout: float = 5) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)

    def close(self) -> None:
        for proc, _ in reversed(self.procs):
            self.stop(proc)
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def protocol_counters(ifname: str, echo_from: str | None = None, echo6_from: str | None = None) -> str:
    """An nftables table counting what arrives on ifname of the protocols that only a layer-3
    dataplane passes (SCTP, GRE, either family), ICMP (echo requests from echo_from, when given) and
    ICMPv6 echo requests (from echo6_from, when given; never neighbour discovery)."""
    icmp = f"icmp type echo-request ip saddr {echo_from}" if echo_from else "meta l4proto icmp"
    icmp6 = f"ip6 saddr {echo6_from} " if echo6_from else ""
    return f"""table inet count {{
    chain pre {{
        type filter hook prerouting priority -300; policy accept;
        iifname "{ifname}" meta l4proto sctp counter
        iifname "{ifname}" meta l4proto gre counter
        iifname "{ifname}" {icmp} counter
        iifname "{ifname}" {icmp6}icmpv6 type echo-request counter
    }}
}}
"""


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.1) -> float:
    """Seconds until predicate() is true; LabError (an AssertionError too, for tests) after timeout."""
    t0 = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise LabTimeout(f"condition not met within {timeout} s")
        time.sleep(interval)


def start_wireguard_go(lab: Lab, ns: str, ifname: str, name: str, binary: str = "wireguard-go") -> None:
    """wireguard-go on ifname in ns; returns once its UAPI socket answers to `wg`."""
    lab.spawn(ns, [binary, "-f", ifname], name, env={"LOG_LEVEL": "error"})
    wait_for(lambda: (lab.rundir(ns) / "wireguard" / f"{ifname}.sock").exists(), 10)


def split_wg_quick(conf: str) -> tuple[str, list[str]]:
    """A wg-quick config (as `appliance peer` prints it) as what `wg setconf` takes, and the addresses."""
    keep, addresses = [], []
    for line in conf.splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "Address":
            addresses = [a.strip() for a in line.split("=", 1)[1].split(",")]
        elif key not in ("MTU", "DNS", "Table"):
            keep.append(line)
    return "\n".join(keep) + "\n", addresses


def start_peer(lab: Lab, ns: str, ifname: str, conf: str, mtu: int, binary: str = "wireguard-go") -> None:
    """A WireGuard peer in ns configured from a wg-quick config; routes are the caller's."""
    setconf, addresses = split_wg_quick(conf)
    start_wireguard_go(lab, ns, ifname, f"wg-{ns}-{ifname}", binary)
    lab.run(ns, ["wg", "setconf", ifname, "/dev/stdin"], input=setconf)
    for a in addresses:
        lab.run(ns, ["ip", "addr", "add", a, "dev", ifname])
    lab.run(ns, ["ip", "link", "set", ifname, "mtu", str(mtu), "up"])
