"""age-encrypted secret stores: our files open with the age tool and the tool's open with ours; a
build reads keys it has never seen in plaintext; no private key leaks into outputs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import cli
from appliance.secrets import SecretStore, SecretStoreError, public_key
from conftest import PROFILES, require_tool


@pytest.fixture
def identity(tmp_path: Path) -> tuple[Path, str]:
    require_tool("age-keygen")
    key = tmp_path / "id.age"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    recipient = next(ln.split(": ")[1] for ln in key.read_text().splitlines() if "public key" in ln)
    return key, recipient


def test_encrypt_then_build_without_plaintext(identity: tuple[Path, str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    key, recipient = identity
    store = tmp_path / "secrets"
    result = CliRunner().invoke(cli, ["secrets", "encrypt", str(PROFILES / "exit-node.yaml"), "-r", recipient,
                                      "--remove-plaintext", "--secrets", str(store)])
    assert result.exit_code == 0, result.output
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()) == [
        ".gitignore", "exit-node/private.key.age", "exit-node/psk/phone.key.age"]
    with pytest.raises(SecretStoreError, match="age identity"):
        SecretStore(store).private_key("exit-node")
    monkeypatch.setenv("APPLIANCE_AGE_IDENTITY", str(key))
    private = SecretStore(store).private_key("exit-node")
    out = CliRunner().invoke(cli, ["build", str(PROFILES / "exit-node.yaml"), "--render-only", "--out-dir",
                                   str(tmp_path / "images"), "--secrets", str(store)])
    assert out.exit_code == 0, out.output
    assert not list(store.rglob("*.key")), "a plaintext key was written"
    keys = CliRunner().invoke(cli, ["keys", "exit-node", "--json", "--secrets", str(store)])
    assert json.loads(keys.stdout)["public_key"] == public_key(private)


def test_wrong_identity_is_a_clear_error(identity: tuple[Path, str], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, recipient = identity
    store = tmp_path / "secrets"
    CliRunner().invoke(cli, ["secrets", "encrypt", "edge", "-r", recipient, "--remove-plaintext",
                             "--secrets", str(store)])
    other = tmp_path / "other.age"
    subprocess.run(["age-keygen", "-o", str(other)], check=True, capture_output=True)
    monkeypatch.setenv("APPLIANCE_AGE_IDENTITY", str(other))
    result = CliRunner().invoke(cli, ["keys", "edge", "--secrets", str(store)])
    assert result.exit_code == 1 and "does not decrypt" in result.output


def test_interoperates_with_the_age_tool(identity: tuple[Path, str], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("age")
    key, recipient = identity
    store = tmp_path / "secrets"
    CliRunner().invoke(cli, ["secrets", "encrypt", "edge", "-r", recipient, "--secrets", str(store)])
    plain = (store / "edge/private.key").read_text().strip()
    ours = subprocess.run(["age", "-d", "-i", str(key), str(store / "edge/private.key.age")], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert ours == plain
    # and back: the tool encrypts, we decrypt
    (store / "edge/private.key").unlink()
    (store / "edge/private.key.age").unlink()
    subprocess.run(["age", "-r", recipient, "-o", str(store / "edge/private.key.age")], input=plain + "\n",
                   text=True, check=True)
    monkeypatch.setenv("APPLIANCE_AGE_IDENTITY", str(key))
    assert SecretStore(store).private_key("edge") == plain


def test_no_private_key_in_any_output(tmp_path: Path) -> None:
    """Every private key of the example fleet, searched in rendered trees and --json outputs."""
    store = tmp_path / "secrets"
    fleet = tmp_path / "fleet"
    shutil.copytree(PROFILES, fleet)
    subprocess.run(["git", "init", "-q", str(fleet)], check=True)  # a fleet lives in git: bases above profiles
    outputs = []
    for profile in sorted(fleet.rglob("*.yaml")):
        if profile.name == "base.yaml":
            continue
        for args in (["validate", "--json", str(profile)], ["keys", "--json", str(profile), "--secrets", str(store)],
                     ["render", str(profile), "-o", str(tmp_path / "r" / profile.stem), "--secrets", str(store)]):
            outputs.append(CliRunner().invoke(cli, args).output)
    outputs.append(CliRunner().invoke(cli, ["fleet", "check", "--json", str(fleet)]).output)
    rendered = b"".join(p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file())
    secrets = [f.read_text().strip() for f in store.rglob("*.key")]
    assert len(secrets) >= 5
    for s in secrets:
        assert s.encode() not in rendered
        assert not any(s in o for o in outputs)
