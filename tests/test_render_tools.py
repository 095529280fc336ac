"""The rendered files, checked by the real tools: nft -c, systemd-networkd's parser, systemd-analyze.

Each runs in a throwaway network (and mount) namespace, so nothing touches the host's configuration."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.profile import load_profile
from appliance.render import ConfigTree, render
from appliance.secrets import ApplianceKeys
from conftest import EXAMPLES, PROFILES, require_tool

pytestmark = pytest.mark.root


def _rendered(path: Path, keys: ApplianceKeys, dest: Path) -> ConfigTree:
    tree = render(load_profile(path).profile, keys)
    tree.write(dest)
    return tree


def nft_check(ruleset: Path) -> subprocess.CompletedProcess[str]:
    nft = require_tool("nft")
    return subprocess.run(["unshare", "--net", nft, "-c", "-f", str(ruleset)], capture_output=True, text=True)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_nft_accepts_ruleset(path: Path, fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    _rendered(path, fixed_keys, tmp_path / "t")
    for ruleset in [tmp_path / "t/etc/nftables.conf", *(tmp_path / "t/etc/appliance").glob("*nftables.conf")]:
        result = nft_check(ruleset)
        assert result.returncode == 0, f"{ruleset.name}: {result.stderr}"


def test_nft_check_can_fail(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    tree = _rendered(EXAMPLES[0], fixed_keys, tmp_path / "t")
    broken = tmp_path / "broken.nft"
    broken.write_text(tree.text("etc/nftables.conf").replace("masquerade", "masqerade", 1)
                      .replace("policy drop;", "policy dorp;", 1))
    assert nft_check(broken).returncode != 0


def test_ruleset_loads_and_lists(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    """Load for real in a namespace and read it back: the kernel holds the chains we rendered."""
    nft = require_tool("nft")
    _rendered(Path(__file__).parent.parent / "profiles/subnet-router.yaml", fixed_keys, tmp_path / "t")
    conf = tmp_path / "t/etc/nftables.conf"
    script = f"{nft} -f {conf} && {nft} -f {conf} && {nft} list table inet appliance"  # twice: idempotent
    result = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    listed = result.stdout
    for chain in ("input", "input_from_peers", "forward", "forward_from_peers", "mss_clamp", "postrouting"):
        assert f"chain {chain} {{" in listed
    assert "tcp dport { 443, 8000-8100 }" in listed
    assert listed.count("masquerade") == 1


NETWORKD_SCRIPT = r"""
set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/netif /run/systemd/network
mount --bind "$1" /etc/systemd/network
ip link set lo up
SYSTEMD_LOG_LEVEL=debug SYSTEMD_LOG_TARGET=console timeout 2 "$2" 2>&1 || true
"""


def networkd_messages(network_dir: Path) -> list[str]:
    """Start the real systemd-networkd on the rendered files in a private namespace; return what it
    says about them (parse errors and warnings name the file)."""
    networkd = require_tool("systemd-networkd")
    result = subprocess.run(
        ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", NETWORKD_SCRIPT, "_",
         str(network_dir), networkd], capture_output=True, text=True)
    return [ln for ln in result.stdout.splitlines() if "/etc/systemd/network/" in ln]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_networkd_parses_without_complaint(path: Path, fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    _rendered(path, fixed_keys, tmp_path / "t")
    network = tmp_path / "t/etc/systemd/network"
    # the kernel's WireGuard .netdev names its keys as credentials (networkd 256+), which this host's
    # networkd (252) cannot read: the image's own networkd checks it (test_image)
    for netdev in network.glob("*.netdev"):
        netdev.unlink()
    assert networkd_messages(network) == []


def test_networkd_check_can_fail(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    _rendered(EXAMPLES[0], fixed_keys, tmp_path / "t")
    uplink = next((tmp_path / "t/etc/systemd/network").glob("10-uplink.network"))
    uplink.write_text(uplink.read_text().replace("DHCP=ipv4", "DHCP=ipv4\nDHCPP=yes"))
    assert any("Unknown key" in m and "DHCPP" in m for m in networkd_messages(tmp_path / "t/etc/systemd/network"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_systemd_analyze_verifies_units(path: Path, fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    require_tool("ethtool")
    tree = _rendered(path, fixed_keys, tmp_path / "t")
    # units that run host tools (ethtool); the dataplane units are verified in the image's own tree
    units = [e.path for e in tree if e.path.startswith("etc/systemd/system/") and e.path.endswith("@.service")]
    assert units
    for unit in units:
        instance = tmp_path / Path(unit).name.replace("@.service", "@eth0.service")
        shutil.copy(tmp_path / "t" / unit, tmp_path / Path(unit).name)
        result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(instance)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "appliance-offload" not in result.stderr, result.stderr


def test_nft_accepts_the_narrowed_ways(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    """block_local_networks (set exclusions) and a SOCKS5 proxy on the LAN (an input rule by link
    group and address): rulesets the examples do not have."""
    shutil.copy(PROFILES / "exit-node.yaml", tmp_path)
    shutil.copy(PROFILES / "subnet-router.yaml", tmp_path)
    (tmp_path / "a.yaml").write_text("extends: exit-node.yaml\nfirewall: {block_local_networks: true}\n")
    (tmp_path / "b.yaml").write_text("extends: subnet-router.yaml\n"
                                     "dataplane: {mode: userspace, socks5: '192.168.10.1:1080'}\n")
    keys = ApplianceKeys(fixed_keys.private_key, fixed_keys.preshared_keys, "pass-word")
    for name in ("a", "b"):
        render(load_profile(tmp_path / f"{name}.yaml").profile, keys).write(tmp_path / name)
        result = nft_check(tmp_path / name / "etc/nftables.conf")
        assert result.returncode == 0, f"{name}: {result.stderr}"


def test_real_tools_accept_dns_settings(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    """Split DNS on the LAN link (networkd's parser) and the resolver's firewall rules (nft -c)."""
    shutil.copy(PROFILES / "subnet-router.yaml", tmp_path)
    (tmp_path / "dns.yaml").write_text("extends: subnet-router.yaml\ndns: {lan: true, upstreams: [9.9.9.9], "
                                       "domains: [corp.example, lab.example], lan_resolvers: [192.168.10.53]}\n")
    render(load_profile(tmp_path / "dns.yaml").profile, fixed_keys).write(tmp_path / "t")
    result = nft_check(tmp_path / "t/etc/nftables.conf")
    assert result.returncode == 0, result.stderr
    network = tmp_path / "t/etc/systemd/network"
    for netdev in network.glob("*.netdev"):
        netdev.unlink()
    assert networkd_messages(network) == []
