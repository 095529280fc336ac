"""Host settings the dataplane depends on: sysctls and NIC offloads (ethtool)."""

from __future__ import annotations

import fnmatch
import glob
import re
import subprocess
from pathlib import Path

from pyroute2.iproute.linux import IPRoute

from .config import LinkConfig

PROC_SYS = Path("/proc/sys")


def _sysctl_paths(key: str) -> list[Path]:
    path = PROC_SYS / key.replace(".", "/")
    return [Path(p) for p in sorted(glob.glob(str(path)))] if any(c in key for c in "*?[") else [path]


def ensure_sysctls(wanted: dict[str, str], dry: bool) -> tuple[list[str], list[str]]:
    changes, errors = [], []
    for key, value in sorted(wanted.items()):
        for path in _sysctl_paths(key):
            try:
                current = " ".join(path.read_text().split())
            except OSError as e:
                errors.append(f"sysctl {key}: {e.strerror}")
                continue
            if current != " ".join(value.split()):
                changes.append(f"sysctl {path.relative_to(PROC_SYS)} = {value}")
                if not dry:
                    try:
                        path.write_text(value)
                    except OSError as e:
                        errors.append(f"sysctl {key}: {e.strerror}")
    return changes, errors


def _matches(link: LinkConfig, name: str, macs: set[str]) -> bool:
    if link.match_mac:
        return link.match_mac in macs
    return bool(link.match_name) and fnmatch.fnmatchcase(name, str(link.match_name))


def matching_links(ipr: IPRoute, link: LinkConfig) -> list[str]:
    names = []
    for msg in ipr.get_links():
        name = msg.get_attr("IFLA_IFNAME")
        macs = {str(msg.get_attr(a) or "").lower() for a in ("IFLA_PERM_ADDRESS", "IFLA_ADDRESS")}
        if _matches(link, name, macs):
            names.append(name)
    return sorted(names)


_FEATURE = re.compile(r"^([a-z0-9-]+): (on|off)( \[fixed\])?", re.M)


def features(ifname: str) -> dict[str, tuple[bool, bool]]:
    """ethtool -k: feature -> (on, fixed)."""
    out = subprocess.run(["ethtool", "-k", ifname], capture_output=True, text=True).stdout
    return {m.group(1): (m.group(2) == "on", bool(m.group(3))) for m in _FEATURE.finditer(out)}


def ensure_offloads(ifname: str, wanted: dict[str, bool], dry: bool) -> tuple[list[str], list[str]]:
    have = features(ifname)
    changes, errors = [], []
    args = []
    for feature, on in sorted(wanted.items()):
        state = have.get(feature)
        if state is None:
            errors.append(f"{ifname}: the kernel or driver has no {feature}")
        elif state[0] != on:
            if state[1]:
                errors.append(f"{ifname}: {feature} is fixed {'on' if state[0] else 'off'}")
            else:
                args += [feature, "on" if on else "off"]
                changes.append(f"{ifname} {feature} {'on' if on else 'off'}")
    if args and not dry:
        proc = subprocess.run(["ethtool", "-K", ifname, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            errors.append(f"ethtool -K {ifname}: {proc.stderr.strip()}")
    return changes, errors
