"""Hostile strings in every string field of the model: each is refused with a ProfileError, or the
profile renders files whose shape is that of the same profile with a plain value (no line, section
or key added: nothing injected), and the real parsers accept them. Never a traceback.

The fast test feeds generated strings (line breaks, quotes, NUL, Unicode separators, path separators,
very long values, and the field's own value with those around it). The root tests run the real
parsers over values that pass validation but sit at the edges of each grammar: nft -c, systemd-networkd
and systemd-sysctl here; udevadm verify and systemd 257's networkd in the image's own root tree
(test_image.test_image_tools_accept_edge_values)."""

from __future__ import annotations

import copy
import io
import ipaddress
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from appliance.profile import ProfileError, load_profile
from appliance.render import ConfigTree, render
from appliance.secrets import ApplianceKeys, generate_private_key
from conftest import require_tool

KEYS = ApplianceKeys(generate_private_key(), {"laptop": generate_private_key()}, "pass-word")
BASE: dict[str, Any] = {
    "name": "edge-1",
    "roles": ["exit-node", "subnet-router"],
    "system": {"timezone": "Europe/Amsterdam", "packages": ["tcpdump"],
               "ssh": {"authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP5A98Fr1yv45rSbxku1EnOc8cwVe4JStajG9N4"
                                           "ICtdJ admin@laptop"]}},
    "interfaces": {
        "uplink": {"match": {"name": "en*"},
                   "ipv4": {"address": "203.0.113.10/24", "gateway": "203.0.113.1", "dns": ["203.0.113.53"]},
                   "ipv6": {"address": "2001:db8::10/64", "gateway": "2001:db8::1"}},
        "lan": {"match": {"mac": "52:54:00:12:34:02"}, "ipv4": {"address": "192.168.10.1/24"}},
    },
    "wireguard": {
        "addresses": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
        "endpoint": "vpn.example.net:51820",
        "peers": [{"name": "laptop", "public_key": "bcZjDEJDw0GrFhwIcsNVVp7ZP6lqfbJdYMtZEZC+Cz0=",
                   "allowed_ips": ["100.64.0.2/32"], "endpoint": "198.51.100.7:51820", "preshared_key": True}],
    },
    "dataplane": {"mode": "kernel", "wireguard": "kernel"},
    "routing": {"advertise_routes": ["192.168.10.0/24"]},
    "firewall": {"acl": [{"peers": ["laptop"], "to": ["192.168.10.0/24:22,443"], "proto": "tcp"}]},
    "dns": {"lan": True, "upstreams": ["203.0.113.53"],
            "domains": ["corp.example"], "lan_resolvers": ["192.168.10.53"]},
}
USERSPACE = {"mode": "userspace", "socks5": "192.168.10.1:1080"}


def _string_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, str):
        return [prefix]
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _string_paths(v, (*prefix, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _string_paths(v, (*prefix, i))]
    return []


def _variant(path: tuple[Any, ...]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    if path == ("dataplane", "socks5"):
        data["dataplane"] = dict(USERSPACE)
    return data


FIELDS = _string_paths(BASE) + [("dataplane", "socks5")]
HOSTILE = ["\n", "\r\n", "\r", "\x00", "\u2028", "\u2029", "\u0085", "\x0b", "\x1b[31m", '"', "'", "`", "\\",
           "/", "../", "..", "*", "?", "[", "]", "{", "}", "$(id)", ";", "#", "=", " ", "\t", "%n", "|", "&",
           "\ufeff", "é", "٣", "\U0001f600", "x" * 300]


def _set(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _get(data: dict[str, Any], path: tuple[Any, ...]) -> Any:
    node: Any = data
    for part in path:
        node = node[part]
    return node


def _dump(data: Any) -> str:
    buf = io.StringIO()
    YAML(typ="safe").dump(data, buf)
    return buf.getvalue()


_SKELETON = re.compile(r"\[[A-Za-z]+\]|[A-Za-z][A-Za-z0-9]*=|(chain|table|type|ct|counter|iifname|oifname|meta|ip|"
                       r"ip6|tcp|udp|ACTION|u|enable|Port|PermitRootLogin|HostKey)\b")


def _shape(tree: ConfigTree) -> dict[str, list[str]]:
    """Per text file, the skeleton of its lines: INI section headers and keys, the leading keyword of
    nftables, udev, sshd and preset lines, '*' for any other line. A value that injects a line, a
    section or a key changes it."""
    shape = {}
    for e in tree:
        if e.kind != "file" or e.secret or e.path.startswith("usr/"):
            continue
        lines = e.data.decode().split("\n")
        shape[e.path] = [m.group(0) if (m := _SKELETON.match(ln.strip())) else "*" for ln in lines]
    return shape


def _render(path: Path) -> ConfigTree:
    return render(load_profile(path).profile, KEYS)


def _hostile(value: str) -> st.SearchStrategy[str]:
    fragment = st.sampled_from(HOSTILE)
    return st.one_of(
        st.text(st.characters(blacklist_categories=["Cs"]), max_size=40),
        st.text(st.sampled_from("".join(HOSTILE[:30]) + "abc09.-:/"), min_size=1, max_size=20),
        st.builds(lambda f: value + f, fragment),
        st.builds(lambda f: f + value, fragment),
        st.builds(lambda f, i: value[:i] + f + value[i:], fragment, st.integers(0, max(0, len(value) - 1))),
        st.just(value * 50),
    )


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, list[str]]]:
    d = tmp_path_factory.mktemp("baseline")
    out = {}
    for mode, data in (("kernel", BASE), ("userspace", _variant(("dataplane", "socks5")))):
        f = d / "edge.yaml"
        f.write_text(_dump(data))
        out[mode] = _shape(_render(f))
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_strings_are_refused_or_rendered_harmlessly(data: st.DataObject, tmp_path: Path,
                                                           baselines: dict[str, dict[str, list[str]]]) -> None:
    path = data.draw(st.sampled_from(FIELDS), label="field")
    profile = _variant(path)
    value = data.draw(_hostile(_get(profile, path)), label="value")
    _set(profile, path, value)
    f = tmp_path / "edge.yaml"
    f.write_text(_dump(profile), encoding="utf-8", errors="surrogatepass")
    try:
        tree = _render(f)
    except ProfileError as e:
        assert e.issues and all(i.message for i in e.issues)
        return
    mode = "userspace" if path == ("dataplane", "socks5") else "kernel"
    # an address of the other family is in the grammar, not an injection: it adds that family's rules
    if not _other_family(_get(_variant(path), path), value):
        assert _shape(tree) == baselines[mode], f"{path} = {value!r} changed the rendered files' shape"
    for entry in tree:
        if entry.kind == "file" and not entry.path.startswith("usr/"):
            text = entry.data.decode()
            assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u0085\u2028\u2029]", text), (entry.path, value)


def _other_family(original: Any, value: str) -> bool:
    try:
        return ipaddress.ip_network(value, strict=False).version != ipaddress.ip_network(original, strict=False).version
    except (ValueError, TypeError):
        return False


# Values that pass validation and sit at the edges of the grammars they land in: the real parsers
# must accept what they render.
EDGE_VALUES: list[tuple[tuple[Any, ...], str]] = [
    (("name",), "a"), (("name",), "x" * 63), (("name",), "0-9"),
    (("interfaces", "uplink", "match", "name"), "eth0.10"),
    (("interfaces", "uplink", "match", "name"), "enp[0-9]s0*"),
    (("interfaces", "uplink", "match", "name"), "e?_x-y"),
    (("interfaces", "uplink", "match", "name"), "abcdefghijklmno"),
    (("system", "timezone"), "America/Argentina/Buenos_Aires"), (("system", "timezone"), "Etc/GMT+5"),
    (("system", "packages", 0), "g++"), (("system", "packages", 0), "libc6.1-dev"),
    (("wireguard", "endpoint"), "[2001:db8::1]:65535"), (("wireguard", "endpoint"), "xn--bcher-kva.example:1"),
    (("wireguard", "peers", 0, "endpoint"), "[2001:db8::7]:51820"),
    (("wireguard", "peers", 0, "endpoint"), "peer-1.example.net.:51820"),
    (("wireguard", "peers", 0, "name"), "x" * 63),
    (("dataplane", "socks5"), "[::1]:1080"), (("dataplane", "socks5"), "127.0.0.2:65535"),
]


def edge_trees(tmp_path: Path) -> list[tuple[str, Path]]:
    out = []
    tmp_path.mkdir(parents=True, exist_ok=True)
    for i, (path, value) in enumerate(EDGE_VALUES):
        profile = _variant(path)
        _set(profile, path, value)
        if path == ("wireguard", "peers", 0, "name"):
            profile["firewall"]["acl"][0]["peers"] = [value]
        if path[-1] == "name" and path[0] == "interfaces":
            profile["interfaces"]["uplink"]["ipv6"] = "ra"  # the sysctl key that names the interface
        f = tmp_path / f"p{i}.yaml"
        f.write_text(_dump(profile))
        dest = tmp_path / f"t{i}"
        p = load_profile(f).profile
        psk = {p.wireguard.peers[0].name: KEYS.preshared_keys["laptop"]}
        tree = render(p, ApplianceKeys(KEYS.private_key, psk, KEYS.socks5_password))
        tree.write(dest, include_secrets=True)
        out.append((f"{'.'.join(map(str, path))}={value}", dest))
    return out


@pytest.mark.root
def test_real_parsers_accept_edge_values(tmp_path: Path) -> None:
    from test_render_tools import networkd_messages, nft_check

    for what, root in edge_trees(tmp_path):
        result = nft_check(root / "etc/nftables.conf")
        assert result.returncode == 0, f"{what}: {result.stderr}"
        network = root / "etc/systemd/network"
        for netdev in network.glob("*.netdev"):  # the host's networkd (252) cannot read credentials
            netdev.unlink()
        assert networkd_messages(network) == [], what
        if "accept_ra" in (root / "etc/sysctl.d/90-appliance.conf").read_text():
            assert _sysctl_applies(root, what), what


# a NIC each edge interface name (or glob) matches
NIC_FOR = {"eth0.10": "eth0.10", "enp[0-9]s0*": "enp3s0f1", "e?_x-y": "ea_x-y", "abcdefghijklmno": "abcdefghijklmno",
           "en*": "en0"}


def _sysctl_applies(root: Path, what: str) -> bool:
    """systemd-sysctl (what the image runs) sets accept_ra on a NIC the rendered key names."""
    sysctl = require_tool("systemd-sysctl")
    name = next(n for glob, n in NIC_FOR.items() if what.endswith("=" + glob) or (glob == "en*" and "=" not in what))
    script = ('ip link add "$1" type veth peer name peer0 && "$2" "$3" 2>/dev/null; '
              'cat "/proc/sys/net/ipv6/conf/$1/accept_ra"')
    res = subprocess.run(["unshare", "--net", "sh", "-c", script, "_", name, sysctl,
                          str(root / "etc/sysctl.d/90-appliance.conf")], capture_output=True, text=True)
    return res.stdout.strip() == "2"
