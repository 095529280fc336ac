"""testinfra checks of a built root tree (chroot backend): run by appliance build, see static.py.

Expectations come from the JSON file named by $APPLIANCE_EXPECT: the rendered config tree's
manifest, the units that must be enabled, the packages, and the paths of key files. Each check asks
the tree once for everything it needs (one stat, one sha256sum, one dpkg-query) and reports every
mismatch, so the suite stays well under a second."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from typing import Any

with open(os.environ["APPLIANCE_EXPECT"]) as _f:
    EXPECT: dict[str, Any] = json.load(_f)
ROWS: list[dict[str, Any]] = EXPECT["config"]


def _quoted(paths: list[str]) -> str:
    return " ".join(shlex.quote("/" + p) for p in paths)


def test_rendered_files_owner_mode_kind(host: Any) -> None:
    out = host.check_output(f"stat -c '%n|%U|%G|%a|%F' {_quoted([r['path'] for r in ROWS])}")
    seen = {}
    for line in out.splitlines():
        name, user, group, mode, kind = line.split("|")
        seen[name.lstrip("/")] = (user, group, int(mode, 8), kind)
    kinds = {"file": "regular file", "dir": "directory", "symlink": "symbolic link"}
    wrong = []
    for r in ROWS:
        got = seen.get(r["path"])
        if got is None:
            wrong.append(f"{r['path']}: missing")
            continue
        user, group, mode, kind = got
        if (user, group) != ("root", "root"):
            wrong.append(f"{r['path']}: owner {user}:{group}")
        if kind.replace("empty ", "") != kinds[r["kind"]]:
            wrong.append(f"{r['path']}: {kind}, expected {kinds[r['kind']]}")
        if r["kind"] != "symlink" and mode != int(r["mode"], 8):
            wrong.append(f"{r['path']}: mode {mode:04o}, expected {r['mode']}")
    assert not wrong, "\n".join(wrong)


def test_rendered_file_contents(host: Any) -> None:
    files = [r for r in ROWS if r["kind"] == "file" and not r.get("secret")]
    out = host.check_output(f"sha256sum {_quoted([r['path'] for r in files])}")
    sums = {path.lstrip("/"): digest for digest, path in (line.split(None, 1) for line in out.splitlines())}
    wrong = [r["path"] for r in files if sums.get(r["path"]) != r["sha256"]]
    assert not wrong, f"content differs from the render: {wrong}"


def _find(host: Any, paths: list[str], fmt: str) -> dict[str, str]:
    """One find over all paths (each program starts through qemu-user on another architecture's
    tree, so one process, not one per path): path -> its -printf line; a missing path is absent."""
    out = host.run(f"find {_quoted(paths)} -maxdepth 0 -printf '%p|{fmt}\\n'").stdout
    return dict(line.split("|", 1) for line in out.splitlines())


def test_symlink_targets(host: Any) -> None:
    links = [r for r in ROWS if r["kind"] == "symlink"]
    targets = _find(host, [r["path"] for r in links], "%l")
    wrong = [f"{r['path']}: {targets.get('/' + r['path'])!r}, expected {r['target']!r}" for r in links
             if targets.get("/" + r["path"]) != r["target"]]
    assert not wrong, "\n".join(wrong)


def test_units_enabled(host: Any) -> None:
    units = EXPECT["enabled_units"]
    states = host.run(f"systemctl is-enabled {' '.join(units)}").stdout.split()
    assert dict(zip(units, states, strict=True)) == {u: "enabled" for u in units}


def test_packages_installed(host: Any) -> None:
    out = host.check_output("dpkg-query -W -f '${Package} ${db:Status-Status}\\n'")
    installed = {name for name, status in (line.split() for line in out.splitlines()) if status == "installed"}
    assert sorted(set(EXPECT["packages"]) - installed) == []


def test_key_files_root_only(host: Any) -> None:
    assert EXPECT["secret_paths"]
    want = {"/etc/credstore": "root|700|d", **{"/" + p: "root|600|f" for p in EXPECT["secret_paths"]}}
    got = _find(host, [p.lstrip("/") for p in want], "%u|%m|%y")
    wrong = [f"{p}: {got.get(p, 'missing')}, expected {w}" for p, w in want.items() if got.get(p) != w]
    assert not wrong, "\n".join(wrong)


def test_private_key_nowhere_else(host: Any) -> None:
    """grep reads the key from its own file, so it never appears on a command line."""
    key_file = "/" + EXPECT["secret_paths"][0]
    found = host.run(f"grep -rlF -f {key_file} /etc /root /usr/local /var /opt /srv 2>/dev/null")
    assert set(found.stdout.split()) <= {"/" + p for p in EXPECT["secret_paths"]}


def test_host_identity(host: Any) -> None:
    """No SSH host key in the image: each device makes its own at first boot, on its data partition.
    The machine id is the appliance's own (from its name, in the configuration: the root is
    read-only), not one the build made."""
    assert not host.run("ls /etc/ssh/ssh_host_* /var/lib/ssh 2>/dev/null").stdout.strip()
    machine_id = host.run("cat /etc/machine-id").stdout
    row = next(r for r in EXPECT["config"] if r["path"] == "etc/machine-id")
    assert re.fullmatch(r"[0-9a-f]{32}\n", machine_id)
    assert hashlib.sha256(machine_id.encode()).hexdigest() == row["sha256"]


def test_kernel_only_in_the_uki(host: Any) -> None:
    """Kernel and initramfs boot from the UKI on the ESP; the root keeps the modules they load."""
    found = host.run("ls -d /boot/vmlinuz-* /boot/initrd.img-* /vmlinuz /initrd.img /usr/lib/modules/*/modules.dep "
                     "/usr/lib/modules/*/kernel/drivers/net/wireguard/wireguard.ko* 2>/dev/null").stdout.split()
    assert not [f for f in found if re.fullmatch(r"(/boot)?/(vmlinuz|initrd\.img)(-.*)?", f)], found
    assert [f for f in found if f.endswith("/modules.dep")], found
    assert [f for f in found if re.search(r"/wireguard\.ko(\.\w+)?$", f)], found


def _missing_modules(host: Any, names: list[str]) -> list[str]:
    """The names the tree's modinfo does not find (a module file or built into the kernel), asked in
    one call: modinfo reports each name it cannot find and goes on with the others."""
    if not names:
        return []
    result = host.run(f"modinfo -k $(ls /usr/lib/modules) -F filename {' '.join(shlex.quote(n) for n in names)}")
    missing = re.findall(r"Module (\S+) not found", result.stderr)
    assert result.rc == 0 or missing, result.stderr  # failed otherwise, e.g. no module directory
    return sorted(set(missing))


def test_kernel_modules_the_profile_keeps(host: Any) -> None:
    """Every module of system.kernel_modules is in the tree (or built into the kernel), although its
    kind is left out of the image."""
    missing = _missing_modules(host, EXPECT.get("kernel_modules", []))
    assert not missing, f"not in the image: {missing}"


def test_ruleset_checks_with_image_nft(host: Any) -> None:
    """The image's own nft (trixie) accepts the ruleset; -c commits nothing. (An image of another
    architecture: the build checks it with the tools tree's nft.)"""
    if EXPECT.get("foreign_arch"):
        return
    result = host.run("nft -c -f /etc/nftables.conf")
    assert result.rc == 0, result.stderr


def test_boot_modules_exist(host: Any) -> None:
    """Every module the units modprobe at boot is in the tree: a missing one would fail the firewall
    (or wireguard-go) at every boot."""
    lines = host.check_output("cat /etc/systemd/system/*.service.d/*.conf /etc/systemd/system/*.service "
                              "2>/dev/null | grep '^ExecStartPre=/usr/sbin/modprobe' || true").splitlines()
    names = [w for ln in lines for w in ln.split()[1:] if not w.startswith("-")]
    assert names, "no unit loads the firewall's kernel modules"
    missing = _missing_modules(host, names)
    assert not missing, f"not in the tree: {missing}"


def test_sshd_accepts_its_configuration(host: Any) -> None:
    """sshd -t no longer runs at every boot (a whole sshd start on the way to the first login): it
    runs here, with a throwaway host key outside the image's paths."""
    result = host.run("d=$(mktemp -d) && ssh-keygen -q -t ed25519 -N '' -f $d/k && mkdir -p /run/sshd && "
                      "sshd -t -h $d/k; rc=$?; rm -rf $d; rmdir /run/sshd; exit $rc")
    assert result.rc == 0, result.stderr
