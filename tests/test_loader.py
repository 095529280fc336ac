"""Loading: the examples, `extends:` chains (maps merge, lists replace, cycles rejected), positions."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.profile import ProfileError, load_profile, profile_digest
from conftest import EXAMPLES, PROFILES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_are_valid(path: Path) -> None:
    loaded = load_profile(path)
    assert loaded.profile.name
    assert loaded.files[0] == path


def test_examples_cover_every_kind() -> None:
    profiles = {p.stem: load_profile(p).profile for p in EXAMPLES}
    assert {"exit-node", "subnet-router", "userspace-exit-node"} <= set(profiles)
    assert profiles["userspace-exit-node"].dataplane.mode == "userspace"
    assert profiles["subnet-router"].is_subnet_router and not profiles["subnet-router"].is_exit_node


def test_examples_carry_schema_comment() -> None:
    for path in [*EXAMPLES, PROFILES / "fleet" / "base.yaml"]:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# yaml-language-server: $schema="), path
        schema = (path.parent / first.split("$schema=", 1)[1]).resolve()
        assert schema.is_file(), f"{path}: schema comment points at {schema}"


def test_fleet_site_merges_base() -> None:
    site = load_profile(PROFILES / "fleet" / "sites" / "ams.yaml")
    p = site.profile
    assert p.system.timezone == "Europe/Amsterdam"  # from base
    assert p.interfaces.uplink is not None and p.interfaces.uplink.ipv6 == "ra"  # base map merged into site map
    assert p.interfaces.uplink.match.name == "enp1s0"  # site value
    assert [x.name for x in p.wireguard.peers] == ["noc"]
    assert site.files == (PROFILES / "fleet" / "sites" / "ams.yaml", PROFILES / "fleet" / "sites" / "../base.yaml")


def _write(d: Path, name: str, text: str) -> Path:
    f = d / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    return f


CHILD = """\
extends: base.yaml
name: child
wireguard:
  addresses: [100.64.0.9/32]
"""
BASE = """\
roles: [exit-node]
system: {packages: [tcpdump, mtr-tiny], timezone: Europe/Berlin}
interfaces:
  uplink: {match: {name: "en*"}}
wireguard:
  addresses: [100.64.0.1/32, 100.64.0.2/32]
  mtu: 1380
"""


def test_lists_replace_maps_merge(tmp_path: Path) -> None:
    _write(tmp_path, "base.yaml", BASE)
    child = _write(tmp_path, "child.yaml", CHILD + "system: {packages: [htop]}\n")
    p = load_profile(child).profile
    assert [str(a) for a in p.wireguard.addresses] == ["100.64.0.9/32"]  # list replaced
    assert p.wireguard.mtu == 1380  # sibling key kept
    assert p.system.packages == ["htop"] and p.system.timezone == "Europe/Berlin"


def test_chain_of_three(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()  # a fleet's repository: bases may sit above the profile, inside it
    _write(tmp_path, "root.yaml", BASE)
    _write(tmp_path, "mid/base.yaml", "extends: ../root.yaml\nsystem: {timezone: UTC}\n")
    leaf = _write(tmp_path, "mid/leaf.yaml", CHILD)
    loaded = load_profile(leaf)
    assert loaded.profile.system.timezone == "UTC"
    assert loaded.profile.system.packages == ["tcpdump", "mtr-tiny"]
    assert len(loaded.files) == 3


def test_error_points_into_the_base_file(tmp_path: Path) -> None:
    _write(tmp_path, "base.yaml", BASE.replace("mtu: 1380", "mtu: 80"))
    child = _write(tmp_path, "child.yaml", CHILD)
    with pytest.raises(ProfileError) as e:
        load_profile(child)
    (issue,) = e.value.issues
    assert issue.file.endswith("base.yaml") and issue.line == 7 and issue.path == "wireguard.mtu"


def test_cycle_is_rejected(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "extends: b.yaml\nname: a\n")
    _write(tmp_path, "b.yaml", "extends: a.yaml\n")
    with pytest.raises(ProfileError) as e:
        load_profile(tmp_path / "a.yaml")
    assert "extends cycle" in str(e.value) and "a.yaml -> " in str(e.value)


def test_self_extension_is_a_cycle(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", "extends: a.yaml\nname: a\n")
    with pytest.raises(ProfileError, match="extends cycle"):
        load_profile(tmp_path / "a.yaml")


def test_extends_must_be_a_path(tmp_path: Path) -> None:
    f = _write(tmp_path, "a.yaml", "name: a\nextends: [x.yaml]\n")
    with pytest.raises(ProfileError) as e:
        load_profile(f)
    assert e.value.issues[0].line == 2 and "relative path" in e.value.issues[0].message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read profile"):
        load_profile(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text,want", [
    ("", "empty"),
    ("- a\n- b\n", "a map of settings"),
    ("just text\n", "a map of settings"),
    ("? [a, b]\n: c\n", "keys must be text"),
    ("name: [unclosed\n", "YAML syntax error"),
])
def test_degenerate_documents(tmp_path: Path, text: str, want: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ProfileError, match=want):
        load_profile(f)


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ProfileError, match="not UTF-8"):
        load_profile(f)


def test_alias_bomb_is_bounded(tmp_path: Path) -> None:
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i-1}'] * 10)}]")
    f = tmp_path / "bomb.yaml"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ProfileError, match="more than"):
        load_profile(f)


def test_digest_ignores_layout(tmp_path: Path) -> None:
    a = load_profile(PROFILES / "exit-node.yaml").profile
    text = (PROFILES / "exit-node.yaml").read_text().replace("# An exit node", "#  reformatted")
    f = _write(tmp_path, "exit-node.yaml", text.replace("mtu: 1420", "mtu: 1420   # same"))
    assert profile_digest(load_profile(f).profile) == profile_digest(a)
    g = _write(tmp_path, "other.yaml", text.replace("mtu: 1420", "mtu: 1380"))
    assert profile_digest(load_profile(g).profile) != profile_digest(a)
