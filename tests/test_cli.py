"""The command line: every command has --help; validate/keys/peer/render/schema/build behave."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner, Result

from appliance.cli import cli
from appliance.secrets import generate_private_key, public_key
from conftest import EXAMPLES, PROFILES, REPO

COMMANDS = ["validate", "render", "schema", "keys", "peer", "build", "test", "run", "cache", "flash", "fleet",
            "secrets", "update", "status", "rollback"]


def run(*args: str, secrets: Path | None = None) -> Result:
    extra = ["--secrets", str(secrets)] if secrets and args[0] in ("render", "keys", "peer", "build") else []
    return CliRunner().invoke(cli, [*args, *extra])


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command: str | None) -> None:
    result = CliRunner().invoke(cli, [command, "--help"] if command else ["--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_validate_examples_json() -> None:
    result = CliRunner().invoke(cli, ["validate", "--json", *map(str, EXAMPLES)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["valid"] and len(doc["profiles"]) == len(EXAMPLES)
    assert all(len(p["digest"]) == 64 for p in doc["profiles"])


def test_schema_validates_examples() -> None:
    """The schema editors get agrees with the loader on the complete examples."""
    result = CliRunner().invoke(cli, ["schema"])
    schema = json.loads(result.stdout)
    from ruamel.yaml import YAML

    for path in EXAMPLES:
        data = YAML(typ="safe").load(path.read_text())
        if "extends" not in data:
            jsonschema.validate(data, schema)
    bad = YAML(typ="safe").load((PROFILES / "exit-node.yaml").read_text())
    bad["wireguard"]["listen_port"] = 70000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_committed_schema_is_current() -> None:
    result = CliRunner().invoke(cli, ["schema"])
    assert (REPO / "schema" / "profile.schema.json").read_text() == result.stdout, "run `make docs`"


def test_keys_prints_public_key_only(tmp_path: Path) -> None:
    result = run("keys", str(PROFILES / "exit-node.yaml"), "--json", secrets=tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    private = (tmp_path / "exit-node" / "private.key").read_text().strip()
    psk = (tmp_path / "exit-node" / "psk" / "phone.key").read_text().strip()
    assert doc["public_key"] == public_key(private)
    assert doc["preshared_key_peers"] == ["phone"]
    assert private not in result.output and psk not in result.output
    again = run("keys", "exit-node", secrets=tmp_path)
    assert again.exit_code == 0 and doc["public_key"] in again.stdout


def _peer(tmp_path: Path, profile: str, peer: str, *extra: str) -> Result:
    return run("peer", str(PROFILES / profile), peer, *extra, secrets=tmp_path)


def test_peer_config_exit_node(tmp_path: Path) -> None:
    result = _peer(tmp_path, "exit-node.yaml", "phone")
    assert result.exit_code == 0, result.output
    text = result.stdout
    appliance_pub = public_key((tmp_path / "exit-node" / "private.key").read_text().strip())
    psk = (tmp_path / "exit-node" / "psk" / "phone.key").read_text().strip()
    assert f"PublicKey = {appliance_pub}" in text
    assert f"PresharedKey = {psk}" in text
    assert "AllowedIPs = 0.0.0.0/0, ::/0" in text
    assert "Address = 100.64.0.3/32, fd7a:115c:a1e0::3/128" in text
    assert "Endpoint = exit.example.net:51820" in text
    assert (tmp_path / "exit-node" / "private.key").read_text().strip() not in text


def test_peer_config_subnet_router(tmp_path: Path) -> None:
    result = _peer(tmp_path, "subnet-router.yaml", "admin", "--endpoint", "203.0.113.7:51820")
    assert result.exit_code == 0, result.output
    assert "AllowedIPs = 100.64.1.1/32, 192.168.10.0/24" in result.stdout
    assert "Endpoint = 203.0.113.7:51820" in result.stdout
    assert "PresharedKey" not in result.stdout


def test_peer_with_its_own_private_key_parses_with_wg_quick(tmp_path: Path) -> None:
    private = generate_private_key()
    profile = (PROFILES / "exit-node.yaml").read_text().replace(
        "bcZjDEJDw0GrFhwIcsNVVp7ZP6lqfbJdYMtZEZC+Cz0=", public_key(private))
    (tmp_path / "p.yaml").write_text(profile.replace("../schema", str(REPO / "schema")))
    (tmp_path / "laptop.key").write_text(private + "\n")
    result = CliRunner().invoke(cli, ["peer", str(tmp_path / "p.yaml"), "laptop", "--private-key-file",
                                      str(tmp_path / "laptop.key"), "--secrets", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert f"PrivateKey = {private}" in result.stdout
    wg_quick = shutil.which("wg-quick")
    if wg_quick:
        conf = tmp_path / "wg9.conf"
        conf.write_text(result.stdout)
        conf.chmod(0o600)
        stripped = subprocess.run([wg_quick, "strip", str(conf)], capture_output=True, text=True)
        assert stripped.returncode == 0, stripped.stderr
        assert f"PrivateKey = {private}" in stripped.stdout and "Address" not in stripped.stdout


def test_peer_rejects_someone_elses_key(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(generate_private_key())
    result = _peer(tmp_path, "exit-node.yaml", "laptop", "--private-key-file", str(tmp_path / "k"))
    assert result.exit_code == 1 and "does not belong to peer 'laptop'" in result.output


def test_peer_unknown(tmp_path: Path) -> None:
    result = _peer(tmp_path, "exit-node.yaml", "tablet")
    assert result.exit_code == 2 and "no peer named 'tablet' (peers: laptop, phone)" in result.output


def test_peer_qr(tmp_path: Path) -> None:
    result = _peer(tmp_path, "exit-node.yaml", "laptop", "--qr")
    assert result.exit_code == 0
    qr_lines = [ln for ln in result.stdout.splitlines() if "█" in ln or "▀" in ln or "▄" in ln]
    assert len(qr_lines) > 10


def test_render_command(tmp_path: Path) -> None:
    result = run("render", str(PROFILES / "subnet-router.yaml"), "-o", str(tmp_path / "out"), secrets=tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out/etc/nftables.conf").is_file()
    assert not (tmp_path / "out/etc/credstore/network.wireguard.private.wg0").exists()
    manifest = json.loads((tmp_path / "out/.appliance-render.json").read_text())
    assert any(row["path"] == "etc/nftables.conf" for row in manifest)


def test_render_invalid_profile_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    result = run("render", str(bad), "-o", str(tmp_path / "out"), secrets=tmp_path / "s")
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "s").exists()


def test_build_render_only(tmp_path: Path) -> None:
    result = run("build", str(PROFILES / "exit-node.yaml"), "--render-only", "--out-dir", str(tmp_path / "images"),
                 secrets=tmp_path / "s")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "images/exit-node.config/etc/nftables.conf").is_file()
    assert "keys and configuration" in result.output
    assert not (tmp_path / "images/exit-node.img").exists()


@pytest.mark.parametrize("host", ["-oProxyCommand=touch /tmp/x", "edge:0", "edge:ssh", "a b", "@"])
def test_update_commands_refuse_a_bad_host(host: str) -> None:
    """--host is checked before anything is built or connected (no ssh option smuggled in): exit 2."""
    for args in (["update", str(PROFILES / "exit-node.yaml")], ["status"], ["rollback"]):
        result = CliRunner().invoke(cli, [*args, "--host", host])
        assert result.exit_code == 2, (args, result.output)
        assert "--host" in result.output and "Traceback" not in result.output


def test_a_pi_is_not_updated_and_nothing_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Pi has no boot counting to fall back with: `update` says so before keys, builds or SSH.
    Control: without that check the same command goes on to make the keys and build."""
    out, secrets = tmp_path / "images", tmp_path / "secrets"
    args = ["update", str(PROFILES / "rpi4-subnet-router.yaml"), "--host", "127.0.0.1:9", "--out-dir", str(out),
            "--secrets", str(secrets)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "tryboot" in result.output, result.output
    assert not out.exists() and not secrets.exists()

    import appliance.cli
    import appliance.update

    def no_build(*a: object, **k: object) -> None:
        raise SystemExit(7)

    monkeypatch.setattr(appliance.update, "require_updatable", lambda spec: None)
    monkeypatch.setattr(appliance.cli, "_build_image", no_build)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 7 and secrets.exists(), result.output


def test_status_of_a_device_that_does_not_answer(tmp_path: Path) -> None:
    """Nothing listens on the port: `status` says unreachable and exits 4 (ssh is real, loopback only)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n")
    result = CliRunner().invoke(cli, ["status", "--host", f"root@127.0.0.1:{port}", "--ssh-config", str(cfg)])
    assert result.exit_code == 4 and "unreachable" in result.output, result.output


@pytest.mark.parametrize(("raised", "code", "says"),
                         [(KeyboardInterrupt, 130, "interrupted"), (EOFError, 1, "Aborted!")])
def test_an_interrupted_command_exits_as_a_shell_expects(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str],
                                                        raised: type[BaseException], code: int, says: str) -> None:
    """Ctrl-C (or the SIGTERM that unwinds like it) ends a command with 130, the shell's convention for
    SIGINT; a prompt that meets the end of its input stays click's "Aborted!", exit 1. Click's own
    standalone mode says "Aborted!" and exits 1 for both (the control)."""
    import appliance.cli as cli_module

    def interrupted(path: Path) -> None:
        raise raised

    monkeypatch.setattr(cli_module, "load_profile", interrupted)
    monkeypatch.setattr("sys.argv", ["appliance", "validate", str(PROFILES / "exit-node.yaml")])
    with pytest.raises(SystemExit) as exited:
        cli_module.main()
    assert exited.value.code == code and says in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        cli_module.cli(["validate", str(PROFILES / "exit-node.yaml")], standalone_mode=True)
    assert exited.value.code == 1


@pytest.mark.parametrize(("args", "code", "says"), [
    (["--help"], 0, "Usage: appliance"), (["--version"], 0, "appliance, version"),
    (["--bogus"], 2, "No such option '--bogus'"), (["build"], 2, "Missing argument 'PROFILE'"),
    (["validate", "/nonexistent/profile.yaml"], 2, "cannot read profile"),
])
def test_the_installed_command_keeps_clicks_exit_codes(args: list[str], code: int, says: str) -> None:
    proc = subprocess.run([str(Path(shutil.which("appliance") or REPO / ".venv/bin/appliance")), *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == code and says in proc.stdout + proc.stderr, proc
