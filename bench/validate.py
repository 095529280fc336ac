"""Validation time on a big profile: 20,000 allowed IPs over two peers (issue #14's goal: under 2 s),
the YAML read, the model and the cross-field checks timed apart. Median of 5 runs, in this process
(the CLI adds ~0.5 s of interpreter start and imports)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import tempfile
import time
from pathlib import Path

from appliance.profile import load_profile
from appliance.profile.checks import cross_checks
from appliance.profile.model import Profile
from appliance.profile.yamlsource import read

REPO = Path(__file__).resolve().parent.parent


def _ips(first: str, n: int) -> str:
    return "[" + ", ".join(f"{ipaddress.ip_address(first) + i}/32" for i in range(n)) + "]"


def big_profile(dest: Path, per_peer: int = 10_000) -> Path:
    lines = (REPO / "tests/profile_base.yaml").read_text().splitlines()
    lines[22] = f"      allowed_ips: {_ips('10.1.0.0', per_peer)}"
    lines[26] = f"      allowed_ips: {_ips('10.2.0.0', per_peer)}"
    dest.write_text("\n".join(lines) + "\n")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/validate.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = big_profile(Path(d) / "big.yaml")
        runs = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            located = read(path)
            t1 = time.perf_counter()
            profile = Profile.model_validate(located.data)
            t2 = time.perf_counter()
            cross_checks(profile)
            t3 = time.perf_counter()
            load_profile(path)
            t4 = time.perf_counter()
            runs.append({"yaml": t1 - t0, "model": t2 - t1, "checks": t3 - t2, "load_profile": t4 - t3})
    med = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    out = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "allowed_ips": 20_000, "runs": args.runs,
           "median_s": med}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"20,000 allowed IPs: load_profile {med['load_profile']:.2f} s (YAML {med['yaml']:.2f}, model "
          f"{med['model']:.2f}, cross checks {med['checks']:.2f}), median of {args.runs}")


if __name__ == "__main__":
    main()
