"""Boot benchmark: seconds from QEMU start to SSH and to the first WireGuard handshake with a lab
peer, for the example profiles (median of --runs), under KVM if it works here, else TCG.

usage: python bench/boot.py [--runs 3] [--out bench/results/boot.json]   (root)"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.errors import ApplianceError  # noqa: E402
from appliance.image import Cache  # noqa: E402
from appliance.profile import load_profile  # noqa: E402
from appliance.ui import step  # noqa: E402
from appliance.verify.boot import BootTest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/boot.json")
    ap.add_argument("profiles", nargs="*", default=["profiles/exit-node.yaml", "profiles/subnet-router.yaml",
                                                         "profiles/userspace-exit-node.yaml"])
    args = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    for path in args.profiles:
        p = load_profile(REPO / path).profile
        runs: list[dict[str, Any]] = []
        for _ in range(args.runs):
            try:
                report = BootTest(p, Cache(), step).run()
            except ApplianceError as e:  # a lab that did not come up is a result too: keep going
                print(f"{p.name}: the lab did not come up: {e}", file=sys.stderr)
                failed.append(f"{p.name}: {str(e).splitlines()[0]}")
                continue
            if not report.ok:
                sys.exit(f"{p.name}: the suite failed: {report.failures}\n{report.output[-3000:]}")
            runs.append(report.timings | {"accel": report.accel, "retried": len(report.emulator_faults)})
        if not runs:
            continue
        results[p.name] = {
            "accel": runs[0]["accel"],
            "boot_to_ssh_s": statistics.median(r["boot_to_ssh"] for r in runs),
            "boot_to_handshake_s": statistics.median(r["boot_to_handshake"] for r in runs),
            "runs": runs,
        }
    out = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results, "failed": failed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for name, r in results.items():
        print(f"{name:16} {r['accel']}: boot to SSH {r['boot_to_ssh_s']:.1f} s, "
              f"to first handshake {r['boot_to_handshake_s']:.1f} s (median of {len(r['runs'])})")
    if failed:
        sys.exit(f"{len(failed)} boot(s) did not come up: " + "; ".join(failed))


if __name__ == "__main__":
    main()
