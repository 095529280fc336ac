"""Table of real mistakes: each edits one line of a valid profile (tests/profile_base.yaml) and states
the line, the field path and the words the error must carry. Exit status 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import cli

BASE = (Path(__file__).parent / "profile_base.yaml").read_text().splitlines()
KEY_LAPTOP = "bcZjDEJDw0GrFhwIcsNVVp7ZP6lqfbJdYMtZEZC+Cz0="


@dataclass(frozen=True)
class Case:
    id: str
    line: int  # line of profile_base.yaml to replace (1-based)
    new: list[str]  # replacement lines; [] deletes the line
    want_line: int
    want_path: str
    want: str  # fragment of the message

    def text(self) -> str:
        lines = BASE[: self.line - 1] + self.new + BASE[self.line:]
        return "\n".join(lines) + "\n"


CASES = [
    Case("name-uppercase", 1, ["name: Edge_1"], 1, "name", "hostname label"),
    Case("name-missing", 1, [], 1, "name", "required field 'name' is missing"),
    Case("role-typo", 2, ["roles: [exit-node, subnet-routr]"], 2, "roles[1]", "'exit-node' or 'subnet-router'"),
    Case("roles-empty", 2, ["roles: []"], 2, "roles", "at least 1"),
    Case("role-twice", 2, ["roles: [exit-node, exit-node]"], 2, "roles[1]", "listed twice"),
    Case("timezone", 4, ["  timezone: Mars/Olympus"], 4, "system.timezone", "IANA time zone"),
    Case("packages-typo", 5, ["  packges: [tcpdump]"], 5, "system.packges", "did you mean 'packages'"),
    Case("package-name", 5, ["  packages: [tcpdump, Vim]"], 5, "system.packages[1]", "Debian package name"),
    Case("module-name", 5, ['  kernel_modules: [iwlwifi, "snd hda; rm -rf /"]'], 5, "system.kernel_modules[1]",
         "kernel module name"),
    Case("rpi4-amd64", 4, ["  board: rpi4", "  timezone: UTC"], 4, "system.board", "runs arm64, not amd64"),
    Case("rpi5", 4, ["  board: rpi5", "  arch: arm64", "  timezone: UTC"], 4, "system.board", "RP1"),
    Case("board-typo", 4, ["  board: raspberrypi", "  timezone: UTC"], 4, "system.board", "'rpi4'"),
    Case("board-list", 4, ["  board: []", "  timezone: UTC"], 4, "system.board", "'rpi4'"),  # found by fuzzing
    Case("ssh-key-garbage", 7, ['    authorized_keys: ["my laptop key"]'], 7, "system.ssh.authorized_keys[0]",
         "OpenSSH public key"),
    Case("match-both", 10, ['    match: {name: "en*", mac: "52:54:00:12:34:01"}'], 10, "interfaces.uplink.match",
         "exactly one of name"),
    Case("match-neither", 10, ["    match: {}"], 10, "interfaces.uplink.match", "exactly one of name"),
    Case("mac-short", 14, ['    match: {mac: "52:54:00:12:34"}'], 14, "interfaces.lan.match.mac", "MAC address"),
    Case("ipv4-typo", 11, ["    ipv4: dchp"], 11, "interfaces.uplink.ipv4", "expected 'dhcp' or 'off'"),
    Case("ipv6-typo", 12, ["    ipv6: slaac"], 12, "interfaces.uplink.ipv6", "expected 'ra' or 'off'"),
    Case("static-no-prefix", 15, ["    ipv4: {address: 192.168.10.1}"], 15, "interfaces.lan.ipv4.address",
         "prefix length"),
    Case("gateway-outside", 11, ["    ipv4: {address: 203.0.113.10/24, gateway: 198.51.100.1}"], 11,
         "interfaces.uplink.ipv4.gateway", "outside 203.0.113.0/24"),
    Case("lan-gateway", 15, ["    ipv4: {address: 192.168.10.1/24, gateway: 192.168.10.254}"], 15,
         "interfaces.lan.ipv4.gateway", "belongs on the uplink"),
    Case("same-nic", 10, ['    match: {mac: "52:54:00:12:34:02"}'], 14, "interfaces.lan.match", "same NIC"),
    Case("listen-port-range", 17, ["  listen_port: 70000"], 17, "wireguard.listen_port", "65535"),
    Case("listen-port-text", 17, ["  listen_port: fifty"], 17, "wireguard.listen_port", "valid integer"),
    Case("address-no-prefix", 18, ["  addresses: [100.64.0.1]"], 18, "wireguard.addresses[0]", "prefix length"),
    Case("address-twice", 18, ["  addresses: [100.64.0.1/32, 100.64.0.1/24]"], 18, "wireguard.addresses[1]",
         "listed twice"),
    Case("mtu-small", 19, ["  mtu: 576"], 19, "wireguard.mtu", "1280"),
    Case("key-not-base64", 22, ["      public_key: my-laptop-key"], 22, "wireguard.peers[0].public_key", "base64"),
    Case("key-short", 22, ["      public_key: AAAAAAAA"], 22, "wireguard.peers[0].public_key", "32 bytes"),
    Case("peer-name-twice", 25, ["    - name: laptop"], 25, "wireguard.peers[1].name", "already used"),
    Case("peer-key-twice", 26, [f"      public_key: {KEY_LAPTOP}"], 26, "wireguard.peers[1].public_key",
         "already used"),
    Case("allowed-overlap", 27, ["      allowed_ips: [100.64.0.0/24]"], 27, "wireguard.peers[1].allowed_ips[0]",
         "overlaps 100.64.0.2/32"),
    Case("allowed-host-bits", 27, ["      allowed_ips: [100.64.0.3/24]"], 27, "wireguard.peers[1].allowed_ips[0]",
         "host bits"),
    Case("allowed-own-address", 27, ["      allowed_ips: [100.64.0.0/31]"], 27,
         "wireguard.peers[1].allowed_ips[0]", "own tunnel address"),
    Case("allowed-unspecified", 27, ["      allowed_ips: ['::']"], 27, "wireguard.peers[1].allowed_ips[0]",
         "unspecified"),
    Case("allowed-loopback", 27, ["      allowed_ips: [127.0.0.1/32]"], 27, "wireguard.peers[1].allowed_ips[0]",
         "loopback"),
    Case("keepalive-negative", 24, ["      persistent_keepalive: -5"], 24,
         "wireguard.peers[0].persistent_keepalive", "greater than or equal to 0"),
    Case("peer-endpoint", 24, ["      endpoint: laptop.example.net"], 24, "wireguard.peers[0].endpoint",
         "host:port"),
    Case("peer-key-typo", 24, ["      keepalive: 25"], 24, "wireguard.peers[0].keepalive",
         "did you mean 'persistent_keepalive'"),
    Case("peer-key-missing", 22, [], 21, "wireguard.peers[0].public_key", "required field 'public_key'"),
    Case("mode-typo", 28, ["dataplane: {mode: kernal}"], 28, "dataplane", "'kernel', 'userspace'"),
    Case("userspace-kernel-wg", 28, ["dataplane: {mode: userspace, wireguard: kernel}"], 28,
         "dataplane.wireguard", "userspace mode runs wireguard-go"),
    Case("socks5-in-kernel", 28, ['dataplane: {mode: kernel, socks5: "127.0.0.1:1080"}'], 28, "dataplane.socks5",
         "belongs to mode: userspace"),
    Case("table-main", 29, ["routing: {table: 254, advertise_routes: [192.168.10.0/24]}"], 29, "routing.table",
         "'main' table"),
    Case("route-host-bits", 29, ["routing: {advertise_routes: [192.168.10.1/24]}"], 29,
         "routing.advertise_routes[0]", "written 192.168.10.0/24"),
    Case("route-default", 29, ["routing: {advertise_routes: [0.0.0.0/0]}"], 29, "routing.advertise_routes[0]",
         "exit-node"),
    Case("subnet-router-no-routes", 29, ["routing: {table: 52}"], 29, "routing", "needs routing.advertise_routes"),
    Case("acl-unknown-peer", 33, ['    - {peers: [bob], to: ["192.168.10.0/24:22"], proto: tcp}'], 33,
         "firewall.acl[0].peers[0]", "no peer named 'bob'"),
    Case("acl-port-range", 33, ['    - {peers: [laptop], to: ["192.168.10.0/24:70000"], proto: tcp}'], 33,
         "firewall.acl[0].to[0]", "out of range"),
    Case("acl-ports-icmp", 33, ['    - {peers: [laptop], to: ["192.168.10.0/24:22"], proto: icmp}'], 33,
         "firewall.acl[0].to[0]", "ports need proto: tcp or udp"),
    Case("acl-proto", 33, ['    - {peers: [laptop], to: ["192.168.10.0/24"], proto: sctp}'], 33,
         "firewall.acl[0].proto", "'tcp', 'udp', 'icmp' or 'any'"),
    Case("acl-bad-cidr", 33, ['    - {peers: [laptop], to: ["192.168.300.0/24"], proto: any}'], 33,
         "firewall.acl[0].to[0]", "CIDR[:ports]"),
    Case("yaml-unclosed", 23, ["      allowed_ips: [100.64.0.2/32"], 24, "", "YAML syntax error"),
    Case("yaml-duplicate-key", 19, ["  listen_port: 51821"], 19, "", "duplicate key"),
    Case("yaml-tab", 19, ["\tmtu: 1420"], 19, "", "YAML syntax error"),
    Case("extends-missing", 1, ["extends: base/common.yaml", "name: edge-1"], 1, "extends", "does not exist"),
    Case("shields-up-text", 31, ["  shields_up: maybe"], 31, "firewall.shields_up", "valid boolean"),
]


def test_every_case_changes_the_valid_base() -> None:
    """A case whose edit leaves the base as it was (a wrong line number) would test nothing."""
    assert len({c.id for c in CASES}) == len(CASES)
    base = "\n".join(BASE) + "\n"
    unchanged = [c.id for c in CASES if c.text() == base]
    assert not unchanged, unchanged


def test_base_profile_is_valid(tmp_path: Path) -> None:
    f = tmp_path / "edge.yaml"
    f.write_text("\n".join(BASE) + "\n")
    result = CliRunner().invoke(cli, ["validate", str(f)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_profile(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("edge.yaml").write_text(case.text())
    result = CliRunner().invoke(cli, ["validate", "edge.yaml"])
    output = result.output
    assert result.exit_code == 2, output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in output
    lines = [ln for ln in output.splitlines() if ln.startswith("edge.yaml:")]
    prefix = f"edge.yaml:{case.want_line}:"
    hits = [ln for ln in lines if ln.startswith(prefix) and case.want in ln
            and (f": {case.want_path}: " in ln if case.want_path else True)]
    assert hits, f"expected {prefix}*: {case.want_path}: ...{case.want}... in:\n{output}"


def test_json_errors_carry_position(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == "allowed-overlap")
    f = tmp_path / "edge.yaml"
    f.write_text(case.text())
    result = CliRunner().invoke(cli, ["validate", "--json", str(f)])
    assert result.exit_code == 2
    import json

    doc = json.loads(result.stdout)
    assert doc["valid"] is False
    errors = doc["profiles"][0]["errors"]
    assert {(e["line"], e["column"], e["path"]) for e in errors} == {(27, 21, "wireguard.peers[1].allowed_ips[0]")}
    assert any("overlaps 100.64.0.2/32" in e["message"] for e in errors)
    assert any("own tunnel address" in e["message"] for e in errors)


def test_pasted_key_is_not_echoed(tmp_path: Path) -> None:
    """A private key pasted into public_key by mistake must not end up in a terminal or CI log."""
    secret = "x" * 43  # 43 chars: not valid base64, so it is rejected
    f = tmp_path / "edge.yaml"
    f.write_text("\n".join(BASE).replace(KEY_LAPTOP, secret) + "\n")
    result = CliRunner().invoke(cli, ["validate", str(f)])
    assert result.exit_code == 2
    assert "public_key" in result.output and secret not in result.output


def test_real_process_exit_code_and_no_traceback(tmp_path: Path) -> None:
    f = tmp_path / "edge.yaml"
    f.write_text(CASES[0].text())
    proc = subprocess.run([sys.executable, "-m", "appliance", "validate", str(f)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert ":1:7: name: expected a hostname label" in proc.stderr
