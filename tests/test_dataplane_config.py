"""dataplane.json has one definition (appliance/dataplane/config.py): what the renderer writes is what
the reconciler reads back, field for field, and what appliance-netstack (Go) decodes with unknown
fields refused."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.dataplane.config import DataplaneConfig, Mode
from appliance.profile import load_profile
from appliance.render import DATAPLANE_JSON, render
from appliance.secrets import ApplianceKeys, generate_private_key
from conftest import EXAMPLES, PROFILES

KEYS = ApplianceKeys(generate_private_key(), {"phone": generate_private_key(), "laptop": generate_private_key()},
                     "pass-word")


def _variants(tmp_path: Path) -> list[Path]:
    """The examples, and userspace ones with an ACL and a password-protected proxy on the LAN."""
    shutil.copy(PROFILES / "subnet-router.yaml", tmp_path)
    extra = tmp_path / "us-router.yaml"
    extra.write_text("extends: subnet-router.yaml\ndataplane: {mode: userspace, socks5: '192.168.10.1:1080'}\n"
                     "firewall: {block_local_networks: true}\n")
    return [*EXAMPLES, extra]


def _rendered(path: Path) -> str:
    return render(load_profile(path).profile, KEYS).text(DATAPLANE_JSON)


def test_round_trip(tmp_path: Path) -> None:
    """Parsed and written again, every rendered file is the same text: nothing is lost or added."""
    for path in _variants(tmp_path):
        text = _rendered(path)
        cfg = DataplaneConfig.from_json(json.loads(text))
        assert cfg.dumps() == text, path.name


def test_typed_fields() -> None:
    cfg = DataplaneConfig.from_json(json.loads(_rendered(PROFILES / "userspace-exit-node.yaml")))
    assert cfg.mode is Mode.USERSPACE and cfg.wireguard.implementation == "wireguard-go"
    assert cfg.services and cfg.filter and cfg.socks5 == "127.0.0.1:1080"


def test_round_trip_catches_a_lost_field() -> None:
    raw = json.loads(_rendered(PROFILES / "exit-node.yaml"))
    raw["wireguard"]["peers"][0]["endpoint"] = "198.51.100.1:51820"
    assert DataplaneConfig.from_json(raw).dumps() != _rendered(PROFILES / "exit-node.yaml")


@pytest.mark.root
@pytest.mark.slow
def test_netstack_decodes_every_rendered_file_strictly(tmp_path: Path) -> None:
    """appliance-netstack -check decodes with unknown fields refused: each rendered file passes, a
    file with a field the Go side does not know fails (the check can fail)."""
    from appliance.image.netstack import build_netstack

    binary = build_netstack()
    for path in _variants(tmp_path):
        f = tmp_path / f"{path.stem}.json"
        f.write_text(_rendered(path))
        proc = subprocess.run([str(binary), "-check", "-config", str(f)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
    raw = json.loads(_rendered(PROFILES / "userspace-exit-node.yaml"))
    raw["routing"]["surprise"] = True
    f = tmp_path / "unknown.json"
    f.write_text(json.dumps(raw))
    proc = subprocess.run([str(binary), "-check", "-config", str(f)], capture_output=True, text=True)
    assert proc.returncode == 1 and "surprise" in proc.stderr
