"""Rendering: deterministic trees, the expected files and rules, keys only in root-only files."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from appliance.profile import load_profile
from appliance.render import DATAPLANE_JSON, ConfigTree, render
from appliance.secrets import ApplianceKeys, generate_preshared_key, generate_private_key
from conftest import EXAMPLES, PROFILES


def _tree(name: str, keys: ApplianceKeys) -> ConfigTree:
    return render(load_profile(PROFILES / f"{name}.yaml").profile, keys)


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | str]]:
    snap: dict[str, tuple[int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                snap[rel] = (0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = (stat.S_IMODE(st.st_mode), "dir")
            else:
                snap[rel] = (stat.S_IMODE(st.st_mode), p.read_bytes())
    return snap


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_render_is_deterministic(path: Path, fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    profile = load_profile(path).profile
    keys = ApplianceKeys(fixed_keys.private_key, {p.name: fixed_keys.preshared_keys.get("phone", "")
                                                  for p in profile.wireguard.peers if p.preshared_key})
    a, b = render(profile, keys), render(profile, keys)
    assert a.digest() == b.digest()
    a.write(tmp_path / "a", include_secrets=True, mtime=0)
    b.write(tmp_path / "b", include_secrets=True, mtime=0)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")
    # and again into the same place: replaced, not merged
    a.write(tmp_path / "a", include_secrets=True, mtime=0)
    assert _snapshot(tmp_path / "a") == _snapshot(tmp_path / "b")


def test_only_secret_entries_change_with_the_keys(fixed_keys: ApplianceKeys) -> None:
    other = ApplianceKeys(generate_private_key(), {"phone": generate_preshared_key()})
    a, b = _tree("exit-node", fixed_keys), _tree("exit-node", other)
    changed = {e.path for e in a if e.data != b[e.path].data}
    assert changed == {e.path for e in a if e.secret}
    assert a.digest() != b.digest()


def _secret_values(keys: ApplianceKeys) -> list[str]:
    return [keys.private_key, *keys.preshared_keys.values()]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_keys_only_in_root_only_files(path: Path, fixed_keys: ApplianceKeys) -> None:
    tree = render(load_profile(path).profile, fixed_keys)
    for entry in tree:
        holds_key = any(v.encode() in entry.data for v in _secret_values(fixed_keys))
        assert holds_key == entry.secret, entry.path
        if entry.secret:
            assert entry.mode == 0o600 and entry.path.startswith("etc/credstore/")
    assert tree["etc/credstore"].mode == 0o700


def test_write_leaves_secrets_out_unless_asked(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    tree = _tree("exit-node", fixed_keys)
    tree.write(tmp_path / "plain")
    written = b"".join(p.read_bytes() for p in (tmp_path / "plain").rglob("*") if p.is_file())
    assert not any(v.encode() in written for v in _secret_values(fixed_keys))
    assert not (tmp_path / "plain/etc/credstore/network.wireguard.private.wg0").exists()
    tree.write(tmp_path / "full", include_secrets=True)
    key = tmp_path / "full/etc/credstore/network.wireguard.private.wg0"
    assert key.read_text().strip() == fixed_keys.private_key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "full/etc/credstore").stat().st_mode) == 0o700


def test_write_refuses_foreign_directory(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        _tree("exit-node", fixed_keys).write(tmp_path / "home")
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"


def test_exit_node_content(fixed_keys: ApplianceKeys) -> None:
    t = _tree("exit-node", fixed_keys)
    nft = t.text("etc/nftables.conf")
    assert 'iifname "wg0" oifname != "wg0" counter masquerade' in nft
    assert "tcp option maxseg size set rt mtu" in nft
    assert "meta nfproto ipv4 oifname != \"wg0\" counter accept" in nft
    assert "udp dport 51820 counter accept" in nft
    assert "policy drop" in nft and "shields up" not in nft
    # the kernel's WireGuard: networkd brings wg0 up at boot with the same state as dataplane.json,
    # keys from the credential store (none in the file), routes with the reconciler's mark
    netdev = t.text("etc/systemd/network/30-wg0.netdev")
    assert "Kind=wireguard" in netdev and "PrivateKey=@network.wireguard.private.wg0" in netdev
    assert fixed_keys.private_key not in netdev and "ListenPort=51820" in netdev
    wg_net = t.text("etc/systemd/network/30-wg0.network")
    assert "Unmanaged" not in wg_net and "Address=100.64.0.1/32" in wg_net
    assert "Table=52\nPriority=5270\nFamily=both" in wg_net
    assert "Destination=100.64.0.2/32\nTable=52\nProtocol=52\nScope=link" in wg_net
    assert "Destination=fd7a:115c:a1e0::2/128\nTable=52\nProtocol=52\n" in wg_net
    # no firewall, no network
    assert "Requires=nftables.service" in t.text("etc/systemd/system/systemd-networkd.service.d/20-firewall-first.conf")
    # the reconciler is off the tunnel's way up: it starts after networkd has configured wg0
    unit = t.text("etc/systemd/system/appliance-dataplane.service")
    assert "systemd-networkd-wait-online --interface=wg0" in unit and "CPUWeight" not in unit
    networkd = t.text("etc/systemd/networkd.conf.d/appliance.conf")
    assert "ManageForeignRoutingPolicyRules=no" in networkd and "ManageForeignRoutes=no" in networkd
    assert t["usr/sbin/appliance-dataplane"].mode == 0o755
    assert "from appliance.dataplane.cli import main" in t.text("usr/sbin/appliance-dataplane")
    assert "def apply(" in t.text("usr/lib/appliance/python/appliance/dataplane/reconcile.py")
    assert "ExecStart=/usr/sbin/appliance-dataplane watch" in t.text("etc/systemd/system/appliance-dataplane.service")
    assert t["etc/systemd/system/multi-user.target.wants/appliance-dataplane.service"].target == \
        "/etc/systemd/system/appliance-dataplane.service"
    assert "etc/systemd/system/appliance-wireguard-go.service" not in t  # kernel WireGuard
    sysctl = t.text("etc/sysctl.d/90-appliance.conf")
    assert "net.ipv4.ip_forward = 1" in sysctl and "net.ipv6.conf.all.forwarding = 1" in sysctl
    uplink = t.text("etc/systemd/network/10-uplink.network")
    assert "MACAddress=52:54:00:12:34:01" in uplink and "Group=1" in uplink and "DHCP=ipv4" in uplink
    assert "ethtool -K %I rx-udp-gro-forwarding on rx-gro-list off" in t.text(
        "etc/systemd/system/appliance-offload-uplink@.service")
    assert 'ATTR{address}=="52:54:00:12:34:01"' in t.text("etc/udev/rules.d/90-appliance-offload.rules")


def test_subnet_router_acl_and_shields_up(fixed_keys: ApplianceKeys) -> None:
    t = _tree("subnet-router", fixed_keys)
    nft = t.text("etc/nftables.conf")
    assert "ip saddr { 100.64.1.2/32 } ip daddr 192.168.10.0/24 counter accept" in nft
    assert "ip saddr { 100.64.1.3/32 } ip daddr 192.168.10.20/32 tcp dport { 443, 8000-8100 } counter accept" in nft
    assert 'counter drop comment "shields up' in nft
    assert 'counter drop comment "acl: not allowed"' in nft
    assert "meta nfproto ipv4 oifname" not in nft  # not an exit node: no route to everywhere
    # wireguard-go runs as its own service, with the firewall, and `wg set` gives it keys (read from
    # the root-only credential store) and peers; networkd the TUN's addresses, routes and rule
    wg_go = t.text("etc/systemd/system/appliance-wireguard-go.service")
    assert "ExecStart=/usr/bin/wireguard-go wg0" in wg_go and "Type=forking" in wg_go
    assert "Requires=nftables.service\nAfter=nftables.service" in wg_go
    assert ("ExecStartPost=/usr/bin/wg set wg0 listen-port 51820 private-key "
            "/etc/credstore/network.wireguard.private.wg0\n") in wg_go
    assert "ExecStartPost=/usr/bin/wg set wg0 peer " in wg_go and " allowed-ips 100.64.1.3/32\n" in wg_go
    assert fixed_keys.private_key not in wg_go
    assert "etc/systemd/system/multi-user.target.wants/appliance-wireguard-go.service" in t
    assert "etc/systemd/network/30-wg0.netdev" not in t
    assert "Address=100.64.1.1/32" in t.text("etc/systemd/network/30-wg0.network")
    unit = t.text("etc/systemd/system/appliance-dataplane.service")
    assert "systemd-networkd-wait-online --interface=wg0" in unit and "CPUWeight" not in unit
    assert "Address=192.168.10.1/24" in t.text("etc/systemd/network/10-lan.network")
    assert "net.core.rmem_max = 7340032" in t.text("etc/sysctl.d/90-appliance.conf")


def test_userspace_has_no_kernel_forwarding(fixed_keys: ApplianceKeys) -> None:
    t = _tree("userspace-exit-node", fixed_keys)
    nft = t.text("etc/nftables.conf")
    assert "masquerade" not in nft and "forward_from_peers" not in nft
    assert "udp dport 51820 counter accept" in nft  # wireguard-go's socket stays in the host namespace
    sysctl = t.text("etc/sysctl.d/90-appliance.conf")
    assert "ip_forward" not in sysctl and "ping_group_range = 0 2147483647" in sysctl
    unit = t.text("etc/systemd/system/appliance-userspace.service")
    assert "User=appliance-dp" in unit and "ExecStart=/usr/sbin/appliance-dataplane userspace" in unit
    assert "LoadCredential=wireguard-private-key:/etc/credstore/network.wireguard.private.wg0" in unit
    assert "appliance-dp" in t.text("etc/sysusers.d/appliance.conf")
    # the root reconciler (sysctls, offloads) is off the tunnel's way up; there is no wg0 to wait for
    root_unit = t.text("etc/systemd/system/appliance-dataplane.service")
    assert "After=systemd-networkd.service" in root_unit and "wait-online" not in root_unit
    assert "tcp dport 1080" not in nft  # the SOCKS5 proxy listens on loopback only
    dp = json.loads(t.text(DATAPLANE_JSON))
    assert dp["mode"] == "userspace" and dp["socks5"] == "127.0.0.1:1080"
    assert dp["wireguard"]["implementation"] == "wireguard-go"
    # an exit node without ACLs: peers reach everywhere, the userspace stack applies it
    assert dp["filter"] == [{"sources": [], "destination": "0.0.0.0/0", "proto": "any", "ports": []},
                            {"sources": [], "destination": "::/0", "proto": "any", "ports": []}]


def test_userspace_filter_follows_the_acl(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    """The userspace stack gets the same rules as the kernel's forward_from_peers chain."""
    shutil.copy(Path(__file__).parent.parent / "profiles/subnet-router.yaml", tmp_path)
    profile = tmp_path / "us-router.yaml"
    profile.write_text("extends: subnet-router.yaml\n"
                       "dataplane: {mode: userspace, socks5: '192.168.10.1:1080'}\n"
                       "firewall:\n  acl:\n"
                       "    - {peers: [contractor], to: ['192.168.10.20/32:443,8000-8100'], proto: tcp}\n"
                       "    - {peers: ['*'], to: ['192.168.10.53/32:53'], proto: udp}\n")
    p = load_profile(profile).profile
    with pytest.raises(ValueError, match="password"):  # a proxy for the LAN is never without one
        render(p, fixed_keys)
    t = render(p, dataclasses.replace(fixed_keys, socks5_password="pass-word"))
    dp = json.loads(t.text(DATAPLANE_JSON))
    assert dp["filter"] == [{"sources": ["100.64.1.3/32"], "destination": "192.168.10.20/32", "proto": "tcp",
                             "ports": [[443, 443], [8000, 8100]]},
                            {"sources": [], "destination": "192.168.10.53/32", "proto": "udp", "ports": [[53, 53]]}]
    # a SOCKS5 proxy for the LAN: the host's firewall lets it in on the LAN (link group 2), to that
    # address only; its password reaches the dataplane as a credential, never through dataplane.json
    assert ("meta iifgroup 2 ip daddr 192.168.10.1 tcp dport 1080 counter accept"
            in t.text("etc/nftables.conf"))
    assert dp["socks5_auth"] == {"user": "appliance", "password_credential": "socks5-password"}
    assert "pass-word" not in t.text(DATAPLANE_JSON)
    password = t["etc/credstore/appliance.socks5.password"]
    assert password.secret and password.mode == 0o600
    assert ("LoadCredential=socks5-password:/etc/credstore/appliance.socks5.password"
            in t.text("etc/systemd/system/appliance-userspace.service"))


def test_dataplane_json(fixed_keys: ApplianceKeys) -> None:
    dp = json.loads(_tree("exit-node", fixed_keys).text(DATAPLANE_JSON))
    assert dp["schema"] == 1 and dp["mode"] == "kernel"
    assert dp["routing"]["table"] == 52 and dp["routing"]["rule_priority"] == 5270
    assert {r["destination"] for r in dp["routing"]["routes"]} == {
        "100.64.0.2/32", "100.64.0.3/32", "fd7a:115c:a1e0::2/128", "fd7a:115c:a1e0::3/128"}
    assert dp["interfaces"]["uplink"]["offload"] == {"rx-udp-gro-forwarding": True, "rx-gro-list": False}
    phone = next(p for p in dp["wireguard"]["peers"] if p["name"] == "phone")
    assert phone["preshared_key_file"] == "/etc/credstore/network.wireguard.psk.wg0.phone"
    assert fixed_keys.private_key not in json.dumps(dp)


def test_authorized_keys_and_ssh(tmp_path: Path, fixed_keys: ApplianceKeys) -> None:
    text = (Path(__file__).parent / "profile_base.yaml").read_text()
    f = tmp_path / "edge.yaml"
    f.write_text(text)
    t = render(load_profile(f).profile, fixed_keys)
    assert t.text("root/.ssh/authorized_keys").startswith("ssh-ed25519 AAAAC3")
    assert t["root/.ssh/authorized_keys"].mode == 0o600 and t["root/.ssh"].mode == 0o700
    assert "PasswordAuthentication no" in t.text("etc/ssh/sshd_config.d/10-appliance.conf")
    assert t["etc/localtime"].target == "/usr/share/zoneinfo/UTC"


def test_block_local_networks_narrows_the_way_to_everywhere(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    """An exit node's "everywhere" leaves out local networks when the profile asks; advertised routes
    and ACL rules naming such a network pass as before."""
    shutil.copy(Path(__file__).parent.parent / "profiles/exit-node.yaml", tmp_path)
    profile = tmp_path / "blocked.yaml"
    profile.write_text("extends: exit-node.yaml\nfirewall: {block_local_networks: true}\n")
    t = render(load_profile(profile).profile, fixed_keys)
    nft = t.text("etc/nftables.conf")
    assert ('meta nfproto ipv4 ip daddr != { 10.0.0.0/8, 100.64.0.0/10, 169.254.0.0/16, 172.16.0.0/12, '
            '192.168.0.0/16 } oifname != "wg0" counter accept') in nft
    assert 'ip6 daddr != { fc00::/7, fe80::/10 }' in nft
    plain = render(load_profile(tmp_path / "exit-node.yaml").profile, fixed_keys).text("etc/nftables.conf")
    assert "daddr !=" not in plain


def test_dns_for_peers_and_the_lan(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    """resolved answers on the tunnel address (and the LAN's when asked), forwards to the upstreams,
    asks the LAN's resolvers for split domains; the firewall opens 53 from peers and the LAN only;
    peers are told to use it."""
    from appliance.peer_config import client_config

    shutil.copy(Path(__file__).parent.parent / "profiles/subnet-router.yaml", tmp_path)
    profile = tmp_path / "dns.yaml"
    profile.write_text("extends: subnet-router.yaml\ndns: {lan: true, upstreams: [9.9.9.9], "
                       "domains: [corp.example], lan_resolvers: [192.168.10.53]}\n")
    p = load_profile(profile).profile
    t = render(p, fixed_keys)
    resolved = t.text("etc/systemd/resolved.conf.d/appliance.conf")
    assert "DNSStubListenerExtra=100.64.1.1\nDNSStubListenerExtra=192.168.10.1\nDNS=9.9.9.9\n" in resolved
    lan = t.text("etc/systemd/network/10-lan.network")
    assert "DNS=192.168.10.53\nDomains=~corp.example\n" in lan
    nft = t.text("etc/nftables.conf")
    assert 'meta iifgroup 2 meta l4proto { udp, tcp } th dport 53 counter accept comment "dns for the lan"' in nft
    assert 'meta l4proto { udp, tcp } th dport 53 counter accept comment "dns for peers"' in nft
    assert "iifgroup 1" not in nft.split("chain input_from_peers")[0].split("dns")[0]  # never the uplink
    assert "DNS = 100.64.1.1\n" in client_config(p, p.wireguard.peers[0], "x" * 43 + "=", None)
    # control: dns: {serve: false} serves nothing and tells peers nothing
    profile.write_text("extends: subnet-router.yaml\ndns: {serve: false}\n")
    q = load_profile(profile).profile
    t = render(q, fixed_keys)
    assert "etc/systemd/resolved.conf.d/appliance.conf" not in t and "dport 53" not in t.text("etc/nftables.conf")
    assert "DNS =" not in client_config(q, q.wireguard.peers[0], "x" * 43 + "=", None)


@pytest.mark.parametrize(("routing", "tunnel6", "families", "rule"), [
    ("{}", "fd7a:115c:a1e0::1/128", {4, 6}, 'iifname "wg0" oifname != "wg0" counter masquerade comment "snat"'),
    ("{}", "2001:db8:77::1/128", {4}, 'meta nfproto ipv4 iifname "wg0" oifname != "wg0" counter masquerade'),
    ("{nat66: true}", "2001:db8:77::1/128", {4, 6}, 'iifname "wg0" oifname != "wg0" counter masquerade'),
    ("{snat: false}", "fd7a:115c:a1e0::1/128", set(), ""),
    ("{snat: false, nat66: true}", "fd7a:115c:a1e0::1/128", {6},
     'meta nfproto ipv6 iifname "wg0" oifname != "wg0" counter masquerade comment "nat66"'),
    ("{nat66: false}", "fd7a:115c:a1e0::1/128", {4}, "meta nfproto ipv4 iifname"),
])
def test_nat66_for_ula_tunnels_routed_for_global_ones(fixed_keys: ApplianceKeys, tmp_path: Path, routing: str,
                                                      tunnel6: str, families: set[int], rule: str) -> None:
    """IPv6 is masqueraded by default only when the tunnel's IPv6 addresses are ULAs (they cannot be
    routed back from the internet); a globally routed tunnel prefix is routed as it is."""
    shutil.copy(Path(__file__).parent.parent / "profiles/exit-node.yaml", tmp_path)
    profile = tmp_path / "nat66.yaml"
    peer6 = tunnel6.replace("::1/128", "::2/128")
    profile.write_text(f"extends: exit-node.yaml\nrouting: {routing}\nwireguard:\n  addresses: [100.64.0.1/32, "
                       f'"{tunnel6}"]\n  peers:\n    - {{name: laptop, public_key: '
                       f'bcZjDEJDw0GrFhwIcsNVVp7ZP6lqfbJdYMtZEZC+Cz0=, allowed_ips: [100.64.0.2/32, "{peer6}"]}}\n')
    p = load_profile(profile).profile
    assert p.masquerade_families == families
    nft = render(p, fixed_keys).text("etc/nftables.conf")
    masquerades = [line.strip() for line in nft.splitlines() if "masquerade" in line]
    assert len(masquerades) == (1 if families else 0) and all(m.startswith(rule) for m in masquerades), nft


def test_health_config_follows_the_profile(fixed_keys: ApplianceKeys, tmp_path: Path) -> None:
    """health.json: the SSH port, the grace time and handshakes the profile asks for, and a default
    route expected only when the uplink gets one; the unit is required by boot-complete.target."""
    from appliance.dataplane.health import HealthConfig

    exit_node = render(load_profile(PROFILES / "exit-node.yaml").profile, fixed_keys)
    h = HealthConfig.from_json(json.loads(exit_node.text("etc/appliance/health.json")))
    assert h == HealthConfig(22, 120, True, (), 60)
    unit = exit_node.text("etc/systemd/system/appliance-health.service")
    assert "Before=boot-complete.target" in unit and "RequiredBy=boot-complete.target" in unit
    assert "etc/systemd/system/boot-complete.target.requires/appliance-health.service" in exit_node
    shutil.copy(PROFILES / "exit-node.yaml", tmp_path)
    profile = tmp_path / "static.yaml"
    profile.write_text("extends: exit-node.yaml\nsystem: {ssh: {port: 2200}}\n"
                       "interfaces: {uplink: {ipv4: {address: 198.51.100.2/24}, ipv6: \"off\"}}\n"
                       "health: {grace: 300, handshake_with: [phone], within: 30}\n")
    t = render(load_profile(profile).profile, fixed_keys)
    h = HealthConfig.from_json(json.loads(t.text("etc/appliance/health.json")))
    assert h == HealthConfig(2200, 300, False, ("phone",), 30)
