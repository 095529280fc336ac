"""Dataplane benchmark: one iperf3 TCP stream client -> server (a peer's upload) through the
appliance, median of --reps runs, and the same stream server -> client (iperf3 -R, the download),
for plain forwarding, kernel mode with wireguard-go 0.0.20231211 (TUN TSO/GRO), kernel mode with
bookworm's wireguard-go 0.0.20220316 (no offloads), and the rootless userspace mode.

usage: python bench/dataplane.py [--reps 3] [--seconds 5] [--out bench/results/dataplane.json]  (root)
2 cores are shared by client, appliance, server and both wireguard-go: the figures are CPU-bound."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.verify import dplab  # noqa: E402

OLD = "0.0.20220316-1+b4"


def old_wireguard_go() -> str | None:
    """bookworm's wireguard-go, unpacked into the cache (apt-get download + dpkg -x)."""
    target = Path.home() / ".cache/appliance/bench" / f"wireguard-go-{OLD}"
    binary = target / "usr/bin/wireguard-go"
    if binary.exists():
        return str(binary)
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", f"wireguard-go={OLD}"], cwd=tmp, capture_output=True)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            return None
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True)
    return str(binary)


def iperf(d: dplab.DataplaneLab, seconds: int, reverse: bool = False) -> float:
    cmd = ["iperf3", "-c", dplab.SERVER, "-t", str(seconds), "-J", *(["-R"] if reverse else [])]
    out = d.lab.run(d.client, cmd, timeout=seconds + 30).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def measure(mode: str, reps: int, seconds: int, wireguard_go: str = "wireguard-go"
            ) -> tuple[list[float], list[float]]:
    """(uploads, downloads) in Gbit/s."""
    d = dplab.start(mode, wireguard_go=wireguard_go, tag="b")
    try:
        d.lab.spawn(d.server, ["iperf3", "-s"], "iperf-server")
        time.sleep(0.5)
        return [iperf(d, seconds) for _ in range(reps)], [iperf(d, seconds, True) for _ in range(reps)]
    finally:
        d.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/dataplane.json")
    args = ap.parse_args()
    configs = [("plain forwarding", "plain", "wireguard-go"),
               ("kernel mode, wireguard-go 0.0.20231211 (TUN TSO/GRO)", "kernel", "wireguard-go")]
    old = old_wireguard_go()
    if old:
        configs.append((f"kernel mode, wireguard-go {OLD} (no offloads)", "kernel", old))
    configs.append(("userspace mode (appliance-netstack: wireguard-go + gVisor)", "userspace", "wireguard-go"))
    results: list[dict[str, Any]] = []
    for label, mode, binary in configs:
        up, down = measure(mode, args.reps, args.seconds, binary)
        results.append({"config": label, "gbps_runs": [round(r, 3) for r in up],
                        "gbps_median": round(statistics.median(up), 3),
                        "download_gbps_runs": [round(r, 3) for r in down],
                        "download_gbps_median": round(statistics.median(down), 3)})
    plain = results[0]["gbps_median"]
    kernel = results[1]["gbps_median"]
    for r in results:
        r["ratio_to_plain"] = round(r["gbps_median"] / plain, 3) if plain else None
        r["ratio_to_kernel_mode"] = round(r["gbps_median"] / kernel, 3) if kernel else None
    out = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "reps": args.reps, "seconds": args.seconds,
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{'configuration':58} {'upload':>8} {'x plain':>8} {'x kernel':>8} {'download':>9}  upload runs")
    for r in results:
        print(f"{r['config']:58} {r['gbps_median']:8.3f} {r['ratio_to_plain']:8.3f} {r['ratio_to_kernel_mode']:8.3f} "
              f"{r['download_gbps_median']:9.3f}  {r['gbps_runs']}")


if __name__ == "__main__":
    main()
