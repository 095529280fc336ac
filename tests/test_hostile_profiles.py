"""Profiles written by an attacker or a careless user: each is refused with the field's line and a
reason (exit status 2, no traceback), and nothing of a file that is not a profile is echoed.

The cases edit lines of tests/profile_base.yaml, as test_bad_profiles does; every one of them was
accepted (or crashed, or hung) before the hardening of issue #14."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import cli
from appliance.profile import ProfileError, load_profile
from conftest import REPO

BASE = (Path(__file__).parent / "profile_base.yaml").read_text().splitlines()
STATIC_UPLINK = "    ipv4: {address: 203.0.113.10/24, gateway: 203.0.113.1}"


@dataclass(frozen=True)
class Case:
    id: str
    edits: dict[int, list[str]]  # line of profile_base.yaml (1-based) -> replacement lines
    want_line: int  # in the edited file
    want_path: str
    want: str
    extra: list[str] = field(default_factory=list)  # appended lines

    def text(self) -> str:
        lines: list[str] = []
        for n, line in enumerate(BASE, 1):
            lines += self.edits.get(n, [line])
        return "\n".join(lines + self.extra) + "\n"


def _ips(first: str, n: int) -> str:
    return "[" + ", ".join(f"{ipaddress.ip_address(first) + i}/32" for i in range(n)) + "]"


CASES = [
    # strings that would carry a line break or a quote into a rendered file
    Case("name-newline", {1: ['name: "edge-1\\n"']}, 1, "name", "hostname label"),
    Case("peer-name-newline", {21: ['    - name: "laptop\\n"']}, 21, "wireguard.peers[0].name", "hostname label"),
    Case("package-newline", {5: ['  packages: ["tcpdump\\n"]']}, 5, "system.packages[0]", "Debian package name"),
    Case("ifname-newline", {10: ['    match: {name: "en*\\nMACAddress=52:54:00:00:00:01"}']}, 10,
         "interfaces.uplink.match.name", "line breaks are not allowed"),
    Case("ifname-quote", {10: ["    match: {name: 'e\",RUN+=\"x'}"]}, 10, "interfaces.uplink.match.name",
         "interface name or glob"),
    Case("ifname-empty", {10: ['    match: {name: ""}']}, 10, "interfaces.uplink.match.name", "interface name"),
    Case("ifname-everything", {10: ['    match: {name: "*"}']}, 10, "interfaces.uplink.match.name",
         "matches the tunnel's interface wg0"),
    Case("ifname-tunnel", {10: ['    match: {name: "wg0"}']}, 10, "interfaces.uplink.match.name", "wg0"),
    Case("ifname-loopback", {10: ['    match: {name: "l?"}']}, 10, "interfaces.uplink.match.name", "loopback"),
    Case("ifname-too-long", {10: ['    match: {name: "enp0s31f6abcdefgh"}']}, 10, "interfaces.uplink.match.name",
         "at most 15"),
    Case("ifname-slash", {10: ['    match: {name: "en/0"}']}, 10, "interfaces.uplink.match.name", "interface name"),
    Case("ifname-space", {10: ['    match: {name: "en 0"}']}, 10, "interfaces.uplink.match.name", "interface name"),
    Case("timezone-path", {4: ["  timezone: ../../etc/shadow"]}, 4, "system.timezone", "IANA time zone"),
    Case("ssh-key-newline", {7: ['    authorized_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP5A98Fr1yv45rSbxku1En'
                                 'Oc8cwVe4JStajG9N4ICtdJ a\\ncommand=\\"sh\\" b"]']}, 7,
         "system.ssh.authorized_keys[0]", "line breaks"),
    Case("ssh-key-wrong-blob", {7: ['    authorized_keys: ["ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAAAgQ== x@y"]']}, 7,
         "system.ssh.authorized_keys[0]", "not a valid ssh-ed25519 key"),
    Case("ssh-key-truncated", {7: ['    authorized_keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIP5A98Fr x@y"]']}, 7,
         "system.ssh.authorized_keys[0]", "not a valid ssh-ed25519 key"),
    Case("endpoint-newline", {24: ['      endpoint: "198.51.100.7:51820\\nPostUp = sh"']}, 24,
         "wireguard.peers[0].endpoint", "host:port"),
    Case("endpoint-unicode-digits", {24: ['      endpoint: "vpn.example.net:５１８２０"']}, 24,
         "wireguard.peers[0].endpoint", "host:port"),
    Case("endpoint-bad-host", {24: ['      endpoint: "-x..y:51820"']}, 24, "wireguard.peers[0].endpoint",
         "neither an IP address nor a host name"),
    # YAML that means something other than what a person reads
    Case("port-true", {17: ["  listen_port: true"]}, 17, "wireguard.listen_port", "valid integer"),
    Case("port-text-space", {17: ['  listen_port: "51820 "']}, 17, "wireguard.listen_port", "valid integer"),
    Case("mtu-float", {19: ["  mtu: 1420.0"]}, 19, "wireguard.mtu", "valid integer"),
    Case("shields-yes", {31: ["  shields_up: yes"]}, 31, "firewall.shields_up", "valid boolean"),
    Case("shields-on", {31: ["  shields_up: on"]}, 31, "firewall.shields_up", "valid boolean"),
    Case("tag", {1: ["name: !secret edge-1"]}, 1, "", "YAML tags"),
    Case("unclosed-bracket-at-end", {}, 34, "", "never closed", extra=["  x: [1, 2"]),
    # keys no handshake can use
    Case("key-one", {22: ["      public_key: AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]}, 22,
         "wireguard.peers[0].public_key", "small order"),
    Case("key-small-order", {22: ["      public_key: 4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA="]}, 22,
         "wireguard.peers[0].public_key", "small order"),
    Case("key-all-ones", {22: ["      public_key: //////////////////////////////////////////8="]}, 22,
         "wireguard.peers[0].public_key", "non-canonical"),
    # routes that take the appliance's own links away
    Case("tunnel-prefix-1", {18: ["  addresses: [100.64.0.1/1]"]}, 18, "wireguard.addresses[0]", "/8 or longer"),
    Case("allowed-default", {27: ["      allowed_ips: [0.0.0.0/0]"]}, 27, "wireguard.peers[1].allowed_ips[0]",
         "default route"),
    Case("allowed-v6-default", {27: ["      allowed_ips: [::/0]"]}, 27, "wireguard.peers[1].allowed_ips[0]",
         "default route"),
    Case("allowed-half-internet", {27: ["      allowed_ips: [128.0.0.0/1]"]}, 27,
         "wireguard.peers[1].allowed_ips[0]", "large part of the internet"),
    Case("allowed-ipv4-mapped", {27: ["      allowed_ips: ['::ffff:0.0.0.0/96']"]}, 27,
         "wireguard.peers[1].allowed_ips[0]", "IPv4-mapped"),
    Case("allowed-covers-lan", {27: ["      allowed_ips: [192.168.10.0/25]"]}, 27,
         "wireguard.peers[1].allowed_ips[0]", "the lan's network 192.168.10.0/24"),
    Case("allowed-covers-gateway", {11: [STATIC_UPLINK], 27: ["      allowed_ips: [203.0.113.0/28]"]}, 27,
         "wireguard.peers[1].allowed_ips[0]", "the uplink's"),
    Case("allowed-covers-peer-endpoint",
         {24: ["      endpoint: 198.51.100.7:51820"], 27: ["      allowed_ips: [198.51.100.0/24]"]}, 27,
         "wireguard.peers[1].allowed_ips[0]", "peer 'laptop''s endpoint"),
    Case("tunnel-net-covers-lan", {18: ["  addresses: [192.168.10.2/16]"]}, 18, "wireguard.addresses[0]",
         "the lan's network"),
    # MTUs that cannot work
    Case("uplink-mtu-ipv6", {12: ["    ipv6: ra", "    mtu: 1200"]}, 13, "interfaces.uplink.mtu", "IPv6 needs"),
    Case("uplink-mtu-tunnel", {12: ["    ipv6: ra", "    mtu: 1450"]}, 13, "interfaces.uplink.mtu",
         "cannot carry the tunnel"),
    # a SOCKS5 proxy for the world
    Case("socks5-everywhere", {28: ['dataplane: {mode: userspace, socks5: "0.0.0.0:1080"}']}, 28,
         "dataplane.socks5", "every interface"),
    Case("socks5-everywhere-v6", {28: ['dataplane: {mode: userspace, socks5: "[::]:1080"}']}, 28,
         "dataplane.socks5", "every interface"),
    Case("socks5-hostname", {28: ['dataplane: {mode: userspace, socks5: "localhost:1080"}']}, 28,
         "dataplane.socks5", "not the name"),
    Case("socks5-ssh-port", {28: ['dataplane: {mode: userspace, socks5: "127.0.0.1:22"}']}, 28,
         "dataplane.socks5", "sshd's"),
    Case("userspace-no-snat", {28: ['dataplane: {mode: userspace}'], 29: ["routing: {advertise_routes: "
                                                                       "[192.168.10.0/24], snat: false}"]}, 29,
         "routing.snat", "needs dataplane mode: kernel"),
    Case("health-unknown-peer", {}, 34, "health.handshake_with[0]", "no peer named 'hq'",
         extra=["health: {handshake_with: [hq]}"]),
    Case("userspace-no-nat66", {28: ['dataplane: {mode: userspace}'], 29: ["routing: {advertise_routes: "
                                                                        "[192.168.10.0/24], nat66: false}"]}, 29,
         "routing.nat66", "needs dataplane mode: kernel"),
    Case("dns-domain-newline", {}, 34, "dns.domains[0]", "DNS domain",
         extra=['dns: {domains: ["corp.example\\nDNS=6.6.6.6"], lan_resolvers: [192.168.10.53]}']),
    Case("dns-split-without-resolvers", {}, 34, "dns.lan_resolvers", "takes both",
         extra=["dns: {domains: [corp.example]}"]),
    Case("dns-lan-without-static", {14: ['    match: {mac: "52:54:00:12:34:02"}'], 15: ["    ipv4: dhcp"]}, 34,
         "dns.lan", "static ipv4", extra=["dns: {lan: true}"]),
    Case("metrics-on-ssh-port", {}, 34, "metrics.port", "sshd's", extra=["metrics: {listen_on: [tunnel], port: 22}"]),
    Case("metrics-on-the-uplink", {}, 34, "metrics.listen_on[0]", "'tunnel' or 'lan'",
         extra=["metrics: {listen_on: [uplink]}"]),
    Case("socks5-foreign-address", {28: ['dataplane: {mode: userspace, socks5: "10.9.9.9:1080"}']}, 28,
         "dataplane.socks5", "not an address of this appliance"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_profile(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("edge.yaml").write_text(case.text())
    result = CliRunner().invoke(cli, ["validate", "edge.yaml"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    prefix = f"edge.yaml:{case.want_line}:"
    hits = [ln for ln in result.output.splitlines() if ln.startswith(prefix) and case.want in ln
            and (f": {case.want_path}: " in ln if case.want_path else True)]
    assert hits, f"expected {prefix}*: {case.want_path}: ...{case.want}... in:\n{result.output}"


VALID_VARIANTS = {
    "vlan-name": {10: ['    match: {name: "eth0.10"}']},
    "glob-class": {10: ['    match: {name: "enp[0-9]s0"}']},
    "ipv6-only-tunnel": {18: ["  addresses: [fd7a:115c:a1e0::1/128]"],
                         23: ["      allowed_ips: [fd7a:115c:a1e0::2/128]"],
                         27: ["      allowed_ips: [fd7a:115c:a1e0::3/128]"]},
    "tunnel-slash-24": {18: ["  addresses: [100.64.0.1/24]"]},
    "quoted-port": {17: ["  listen_port: 51820"]},
    "explicit-str-tag": {1: ["name: !!str edge-1"]},
    "merge-key": {1: ["name: edge-1", "x-defaults: &d {timezone: UTC}"], 4: ["  <<: *d"]},
}


@pytest.mark.parametrize("edits", VALID_VARIANTS.values(), ids=VALID_VARIANTS.keys())
def test_correct_profiles_stay_valid(edits: dict[int, list[str]], tmp_path: Path) -> None:
    """Nothing accepted and correct before is refused now."""
    case = Case("valid", edits, 0, "", "")
    text = case.text()
    if "x-defaults" in text:  # a merge key's anchor lives under a known key
        text = text.replace("x-defaults: &d {timezone: UTC}\n", "").replace("  <<: *d", "  timezone: UTC")
    f = tmp_path / "edge.yaml"
    f.write_text(text)
    result = CliRunner().invoke(cli, ["validate", str(f)])
    assert result.exit_code == 0, result.output


def test_crlf_and_bom_still_validate(tmp_path: Path) -> None:
    f = tmp_path / "edge.yaml"
    f.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(BASE) + "\r\n").encode())
    assert CliRunner().invoke(cli, ["validate", str(f)]).exit_code == 0


def test_dotted_vlan_name_gets_a_sysctl_key_that_names_it(tmp_path: Path) -> None:
    """sysctl.d reads dots as separators; a VLAN's name is written in the slash form."""
    from appliance.render import render
    from appliance.secrets import ApplianceKeys, generate_private_key

    f = tmp_path / "edge.yaml"
    f.write_text(Case("v", {10: ['    match: {name: "eth0.10"}'],
                            18: ["  addresses: [100.64.0.1/32, fd7a:115c:a1e0::1/128]"]}, 0, "", "").text())
    tree = render(load_profile(f).profile, ApplianceKeys(generate_private_key(), {}))
    sysctl = tree.text("etc/sysctl.d/90-appliance.conf")
    assert "net/ipv6/conf/eth0.10/accept_ra = 2" in sysctl and "net.ipv6.conf.eth0.10" not in sysctl


# files that are not profiles: refused without echoing them


SECRET_TEXT = "zebra-user: hunter2-password\nyak-admin: s3cr3t-token\n"


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "fleet"
    (repo / ".git").mkdir(parents=True)
    return repo


def _no_echo(output: str) -> None:
    for word in ("hunter2", "s3cr3t", "zebra", "yak-admin"):
        assert word not in output, f"{word!r} echoed in:\n{output}"


def test_extends_outside_the_repository_is_refused_without_echo(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (tmp_path / "secret.yaml").write_text(SECRET_TEXT)
    (repo / "edge.yaml").write_text("extends: ../secret.yaml\n" + "\n".join(BASE) + "\n")
    (repo / "abs.yaml").write_text(f"extends: {tmp_path / 'secret.yaml'}\n" + "\n".join(BASE) + "\n")
    for name in ("edge.yaml", "abs.yaml"):
        result = CliRunner().invoke(cli, ["validate", "--json", str(repo / name)])
        assert result.exit_code == 2
        errors = json.loads(result.stdout)["profiles"][0]["errors"]
        assert errors[0]["line"] == 1 and errors[0]["path"] == "extends"
        assert "outside" in errors[0]["message"]
        _no_echo(result.output)


def test_a_symlinked_profile_may_not_point_outside(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (tmp_path / "secret.yaml").write_text(SECRET_TEXT)
    (repo / "edge.yaml").symlink_to(tmp_path / "secret.yaml")
    result = CliRunner().invoke(cli, ["validate", str(repo / "edge.yaml")])
    assert result.exit_code == 2 and "symlink to a file outside" in result.output
    _no_echo(result.output)
    (repo / "edge.yaml").unlink()  # control: a symlink inside the repository is fine
    (repo / "real.yaml").write_text("\n".join(BASE) + "\n")
    (repo / "edge.yaml").symlink_to("real.yaml")
    assert CliRunner().invoke(cli, ["validate", str(repo / "edge.yaml")]).exit_code == 0


def test_a_yaml_file_that_is_no_profile_is_not_echoed(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / "creds.yaml").write_text(SECRET_TEXT)
    (repo / "edge.yaml").write_text("extends: creds.yaml\n" + "\n".join(BASE) + "\n")
    for args in (["validate", str(repo / "creds.yaml")], ["validate", str(repo / "edge.yaml")],
                 ["fleet", "check", "--json", str(repo)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "not a profile" in result.output, result.output
        _no_echo(result.output)


def test_duplicate_keys_are_placed_not_echoed(tmp_path: Path) -> None:
    f = tmp_path / "edge.yaml"
    f.write_text("\n".join(BASE) + "\nname: hunter2-password\n")
    result = CliRunner().invoke(cli, ["validate", str(f)])
    assert result.exit_code == 2 and f"{f.name}:34:1: duplicate key" in result.output.replace(str(f), f.name)
    _no_echo(result.output)


def test_extends_cycle_and_depth_name_the_line(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / "a.yaml").write_text("name: a\nextends: b.yaml\n")
    (repo / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ProfileError) as e:
        load_profile(repo / "a.yaml")
    (issue,) = e.value.issues
    assert issue.path == "extends" and issue.line == 1 and issue.file.endswith("b.yaml") and "cycle" in issue.message
    for i in range(40):  # a chain deeper than anyone needs (~950 deep overflowed Python's stack)
        (repo / f"c{i}.yaml").write_text(f"extends: c{i + 1}.yaml\n")
    (repo / "c40.yaml").write_text("\n".join(BASE) + "\n")
    result = CliRunner().invoke(cli, ["validate", str(repo / "c0.yaml")])
    assert result.exit_code == 2 and "deeper than 16" in result.output and "Traceback" not in result.output


def _validate_process(path: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", "validate", path], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)


def test_special_files_are_refused_at_once(tmp_path: Path) -> None:
    """A FIFO waits forever for a writer and /dev/zero never ends: neither is read."""
    fifo = tmp_path / "edge.yaml"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        proc = _validate_process(path)
        assert proc.returncode == 2 and "not a regular file" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    repo = _repo(tmp_path)
    (repo / "edge.yaml").write_text("extends: pipe.yaml\n" + "\n".join(BASE) + "\n")
    os.mkfifo(repo / "pipe.yaml")
    proc = subprocess.run([sys.executable, "-m", "appliance", "fleet", "check", str(repo)], capture_output=True,
                          text=True, timeout=30, cwd=REPO)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_symlink_loop_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").symlink_to("b.yaml")
    (tmp_path / "b.yaml").symlink_to("a.yaml")
    proc = _validate_process(str(tmp_path / "a.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_many_allowed_ips_validate_in_bounded_time(tmp_path: Path) -> None:
    """20,000 allowed IPs: the overlap checks sort and sweep (comparing every pair took minutes).
    The goal, under 2 s, is measured by `make bench`; this bound only catches a quadratic check."""
    f = tmp_path / "edge.yaml"
    f.write_text(Case("big", {23: [f"      allowed_ips: {_ips('10.1.0.0', 10000)}"],
                              27: [f"      allowed_ips: {_ips('10.2.0.0', 10000)}"]}, 0, "", "").text())
    t0 = time.monotonic()
    load_profile(f)
    assert time.monotonic() - t0 < 20
    # and an overlap among them is still found
    f.write_text(f.read_text().replace("10.2.0.0/32,", "10.1.20.0/32,", 1))
    with pytest.raises(ProfileError, match="overlaps 10.1.20.0/32"):
        load_profile(f)


# commands that turn names into paths


def test_key_commands_refuse_names_that_are_paths(tmp_path: Path) -> None:
    store = tmp_path / "secrets"
    store.mkdir(mode=0o700)
    (tmp_path / "private.key").write_text("not the store's\n")
    for args in (["keys", ".."], ["keys", "x..y"], ["secrets", "encrypt", "..", "-r",
                                                    "age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj",
                                                    "--remove-plaintext"]):
        result = CliRunner().invoke(cli, [*args, "--secrets", str(store)])
        assert result.exit_code == 2 and "hostname label" in result.output, result.output
    assert (tmp_path / "private.key").read_text() == "not the store's\n"
    assert not list(tmp_path.glob("*.age"))


def test_default_store_is_the_repositorys_whatever_the_working_directory(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPLIANCE_SECRETS", raising=False)
    repo = _repo(tmp_path)
    (repo / "profiles").mkdir()
    (repo / "profiles/edge.yaml").write_text("\n".join(BASE) + "\n")
    monkeypatch.chdir(repo / "profiles")
    first = CliRunner().invoke(cli, ["keys", "--json", "edge.yaml"])
    monkeypatch.chdir(tmp_path)
    again = CliRunner().invoke(cli, ["keys", "--json", "fleet/profiles/edge.yaml"])
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    assert json.loads(first.stdout) == json.loads(again.stdout)
    assert (repo / "secrets/edge-1/private.key").exists() and not (repo / "profiles/secrets").exists()
    assert "*.key" in (repo / "secrets/.gitignore").read_text()


def test_git_add_stages_no_key_wherever_the_store_is(tmp_path: Path) -> None:
    repo = tmp_path / "fleet"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "edge.yaml").write_text("\n".join(BASE) + "\n")
    for store in (repo / "secrets", repo / "nested/keys"):
        assert CliRunner().invoke(cli, ["keys", str(repo / "edge.yaml"), "--secrets", str(store)]).exit_code == 0
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    staged = subprocess.run(["git", "-C", str(repo), "diff", "--cached", "--name-only"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert "edge.yaml" in staged and not [s for s in staged if s.endswith((".key", ".password"))], staged


def test_peer_command_checks_what_lands_in_the_wg_quick_file(tmp_path: Path) -> None:
    profile = REPO / "profiles/exit-node.yaml"
    store = tmp_path / "secrets"
    bad = CliRunner().invoke(cli, ["peer", str(profile), "laptop", "--endpoint", "1.2.3.4:51820\nPostUp = sh -c x",
                                   "--secrets", str(store)])
    assert bad.exit_code == 2 and "PostUp" not in bad.stdout
    key = tmp_path / "laptop.key"
    key.write_text("wrong\n")
    os.chmod(key, 0o644)
    warned = CliRunner().invoke(cli, ["peer", str(profile), "laptop", "--private-key-file", str(key),
                                      "--secrets", str(store)])
    assert "accessible by others" in warned.output


def test_a_peer_with_the_appliances_own_key_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "secrets"
    f = tmp_path / "edge.yaml"
    f.write_text("\n".join(BASE) + "\n")
    own = json.loads(CliRunner().invoke(cli, ["keys", "--json", str(f), "--secrets", str(store)]).stdout)
    f.write_text(f.read_text().replace("bcZjDEJDw0GrFhwIcsNVVp7ZP6lqfbJdYMtZEZC+Cz0=", own["public_key"]))
    result = CliRunner().invoke(cli, ["render", str(f), "-o", str(tmp_path / "out"), "--secrets", str(store)])
    assert result.exit_code == 2 and "edge.yaml:22:19: wireguard.peers[0].public_key" in result.output
    assert "appliance's own public key" in result.output


def test_render_output_is_never_a_foreign_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = str(REPO / "profiles/exit-node.yaml")
    secrets = ["--secrets", str(tmp_path / "secrets")]
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, ["render", profile, "-o", str(out), *secrets]).exit_code == 0
    monkeypatch.chdir(out)  # `-o .` inside an earlier render
    inside = CliRunner().invoke(cli, ["render", profile, "-o", ".", *secrets])
    assert inside.exit_code == 1 and "current directory" in inside.output and out.is_dir()
    monkeypatch.chdir(tmp_path)
    (out / "notes.txt").write_text("mine")  # an earlier render's marker, and a file it did not write
    stray = CliRunner().invoke(cli, ["render", profile, "-o", str(out), *secrets])
    assert stray.exit_code == 1 and "notes.txt" in stray.output and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()  # control: exactly an earlier render is replaced
    assert CliRunner().invoke(cli, ["render", profile, "-o", str(out), *secrets]).exit_code == 0


def test_fleet_diff_takes_revisions_as_revisions(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "profiles/fleet", repo)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-qm", "a"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    result = CliRunner().invoke(cli, ["fleet", "diff", "--repo", str(repo), "--", f"--output={victim}", "HEAD"])
    assert result.exit_code != 0 and victim.read_text() == "keep me"
    # a device whose profile became invalid is "invalid", not "removed"
    ams = repo / "sites/ams.yaml"
    ams.write_text(ams.read_text().replace("name: site-ams", "name: Site_AMS"))
    subprocess.run(["git", "-C", str(repo), "commit", "-qam", "b"], check=True, env=env)
    out = CliRunner().invoke(cli, ["fleet", "diff", "HEAD~1", "HEAD", "--repo", str(repo), "--stat"]).output
    row = next(ln for ln in out.splitlines() if "site-ams" in ln)
    assert "invalid" in row and "removed" not in row
