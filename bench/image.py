"""Image build benchmark: cold build, warm rebuild, config-only rebuild; tree and image sizes; for
each profile given, in the same run (default: the amd64 exit node, then the same on arm64, whose root
tree's maintainer scripts run through qemu-user), so that their figures compare.

usage: python bench/image.py [--profile P ...] [--out bench/results/image.json]
Needs root. The cold build uses a fresh cache (the .deb files are shared, so the network is not
what is measured); warm builds reuse it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
NEW_PEER = ("    - {name: bench-peer, public_key: K96DZC4rXOjZrtOcKzO5/XmhczSwYZHPDHk7snb5xkw=, "
            "allowed_ips: [100.64.0.99/32]}\n")


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    from appliance.verify.vm import kvm_works

    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "kernel": platform.release(),
            "kvm_works": kvm_works(),  # probed: a /dev/kvm node alone is not enough
            "qemu_user": qemu_user()}


def qemu_user() -> str:
    """The qemu-user the kernel runs arm64 programs with: its version decides much of an arm64 build."""
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    lines = entry.read_text().splitlines() if entry.exists() else []
    interpreter = next((ln.split(" ", 1)[1] for ln in lines if ln.startswith("interpreter ")), None)
    if interpreter is None:
        return "none registered"
    # the binfmt-P name expects binfmt's argument layout; the file it links to takes options
    out = subprocess.run([os.path.realpath(interpreter), "--version"], capture_output=True, text=True).stdout
    return f"{interpreter}: {out.splitlines()[0] if out else '?'}"


def build(profile: Path, cache: Path, out: Path, secrets: Path) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "appliance", "build", str(profile), "--out-dir", str(out),
                           "--secrets", str(secrets), "--cache", str(cache), "--json"],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"build failed:\n{proc.stderr[-2000:]}")
    return time.monotonic() - t0, json.loads(proc.stdout)


def row(label: str, seconds: float, m: dict[str, Any]) -> dict[str, Any]:
    stages = m["build"]["stages"]
    assembly = sum(stages.get(k, 0) for k in ("esp", "data_fs", "root_fs", "disk", "outputs"))
    return {"run": label, "seconds": round(seconds, 1), "assembly_s": round(assembly, 1),
            "outside_assembly_s": round(seconds - assembly, 1), "stages": stages}


def bench_profile(profile: Path, shared_debs: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="appliance-bench-"))
    try:
        cache = work / "cache"
        cache.mkdir()
        if shared_debs.is_dir():
            (cache / "debs").symlink_to(shared_debs)
        out, secrets = work / "images", work / "secrets"
        runs = []
        t, cold = build(profile, cache, out, secrets)
        runs.append(row("cold (empty cache, .debs present)", t, cold))
        t, warm = build(profile, cache, out, secrets)
        runs.append(row("warm, no change", t, warm))
        changed = work / profile.name
        changed.write_text(profile.read_text().replace("dataplane:", NEW_PEER + "dataplane:", 1))
        t, cfg = build(changed, cache, out, secrets)
        runs.append(row("warm, config-only change (new peer)", t, cfg))
        name = cold["name"]
        img = cold["outputs"][f"{name}.img"]
        return {
            "profile": str(profile),
            "runs": runs,
            "sizes": {"root_tree_mib": round(cold["root_tree_bytes"] / 2**20, 1),
                      "image_raw_mib": round(img["size"] / 2**20, 1),
                      "image_allocated_mib": round(img["allocated"] / 2**20, 1),
                      "image_zstd_mib": round(cold["outputs"][f"{name}.img.zst"]["size"] / 2**20, 1),
                      "image_zstd_mb": round(cold["outputs"][f"{name}.img.zst"]["size"] / 1e6, 1)},
            "reproducible": warm["outputs"][f"{name}.img"]["sha256"] == img["sha256"],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", type=Path, action="append",
                    help="a profile to build (repeat; default: the exit node on amd64, then on arm64)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/image.json")
    args = ap.parse_args()
    profiles = args.profile or [REPO / "profiles/exit-node.yaml", REPO / "profiles/arm64-exit-node.yaml"]
    shared_debs = Path(os.environ.get("APPLIANCE_CACHE") or Path.home() / ".cache/appliance") / "debs"
    results = [bench_profile(p, shared_debs) for p in profiles]
    m = machine()
    result = {"machine": m, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "profiles": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"machine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}; qemu-user {m['qemu_user']}")
    for r in results:
        print(f"\n{r['profile']}")
        print(f"{'run':40} {'total s':>8} {'assembly s':>11} {'outside s':>10}")
        for run in r["runs"]:
            print(f"{run['run']:40} {run['seconds']:8.1f} {run['assembly_s']:11.1f} {run['outside_assembly_s']:10.1f}")
        s = r["sizes"]
        print(f"root tree {s['root_tree_mib']} MiB; image raw {s['image_raw_mib']} MiB, allocated "
              f"{s['image_allocated_mib']} MiB, zstd {s['image_zstd_mib']} MiB ({s['image_zstd_mb']} MB); "
              f"rebuild bit-identical: {r['reproducible']}")
    base = results[0]["runs"]
    for r in results[1:]:
        ratios = ", ".join(f"{a['run'].split(' (')[0]} {b['seconds'] / a['seconds']:.2f}x"
                           for a, b in zip(base, r["runs"], strict=True))
        print(f"{r['profile']} vs {results[0]['profile']}: {ratios}")


if __name__ == "__main__":
    main()
