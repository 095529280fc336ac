"""Rendered trees of the examples, byte for byte, against golden files (tests/golden/NAME.tree): any
change to what a device gets shows up here as a diff to review.

Refresh them after an intended change with `make golden` (APPLIANCE_REFRESH_GOLDEN=1 pytest this
file), then read the diff in git before committing. Keys are left out (the tree holds none but the
credential store's), and so is the shipped dataplane code (its source is in this repository)."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

from appliance.profile import load_profile
from appliance.render import ConfigTree, render
from appliance.secrets import ApplianceKeys, generate_private_key
from conftest import EXAMPLES

GOLDEN = Path(__file__).parent / "golden"
REFRESH = os.environ.get("APPLIANCE_REFRESH_GOLDEN") == "1"
SHIPPED_CODE = "usr/lib/appliance/python/"


def tree_text(tree: ConfigTree) -> str:
    """One text per tree: each entry's path, kind and mode, then its content (files) or target."""
    parts = []
    for e in tree:
        if e.secret or e.path.startswith(SHIPPED_CODE):
            continue
        head = f"=== {e.path} ({e.kind} {e.mode:04o})"
        if e.kind == "symlink":
            parts.append(f"{head} -> {e.target}\n")
        elif e.kind == "dir":
            parts.append(f"{head}\n")
        else:
            parts.append(f"{head}\n{e.data.decode()}")
    return "".join(parts)


def _keys(path: Path) -> ApplianceKeys:
    p = load_profile(path).profile
    return ApplianceKeys(generate_private_key(), {x.name: generate_private_key() for x in p.wireguard.peers},
                         "golden-password")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_rendered_tree_matches_golden(path: Path) -> None:
    text = tree_text(render(load_profile(path).profile, _keys(path)))
    golden = GOLDEN / f"{path.stem}.tree"
    if REFRESH:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden.name}: run `make golden` and review it"
    want = golden.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), f"golden/{golden.name}",
                                            "rendered", n=2))
        pytest.fail(f"the rendered tree of {path.name} differs from its golden file (`make golden` after an "
                    f"intended change):\n{diff[:6000]}")


def test_golden_check_can_fail(tmp_path: Path) -> None:
    """A planted change (one byte of one file) is caught."""
    path = EXAMPLES[0]
    tree = render(load_profile(path).profile, _keys(path))
    entry = tree["etc/nftables.conf"]
    tree.entries[entry.path] = type(entry)(entry.path, entry.kind, entry.data.replace(b"drop", b"dorp", 1),
                                           entry.mode)
    assert tree_text(tree) != (GOLDEN / f"{path.stem}.tree").read_text()
