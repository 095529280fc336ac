"""NAME.tested.json: a pass of `appliance test` counts for exactly the profile, code and packages it booted."""

from __future__ import annotations

import shutil
from pathlib import Path

import appliance
from appliance.image.tested import code_digest, matching_record, record_path, write_record

PKGS = {"linux-image-cloud-amd64": "6.12.57-1", "systemd": "257.9-1"}


def test_a_pass_matches_only_what_it_booted(tmp_path: Path) -> None:
    write_record(tmp_path, "edge", "p" * 64, PKGS, {"passed": 61})
    record = matching_record(tmp_path, "edge", "p" * 64, PKGS)
    assert record and record["result"] == {"passed": 61} and record["code_digest"] == code_digest()
    assert matching_record(tmp_path, "edge", "q" * 64, PKGS) is None  # the profile changed
    assert matching_record(tmp_path, "edge", "p" * 64, {**PKGS, "systemd": "257.10-1"}) is None  # a package
    assert matching_record(tmp_path, "other", "p" * 64, PKGS) is None  # another device
    assert matching_record(tmp_path, "edge", "", PKGS) is None  # a lab variant's (no profile digest)
    record_path(tmp_path, "edge").write_text("{not json")
    assert matching_record(tmp_path, "edge", "p" * 64, PKGS) is None


def test_the_code_digest_follows_the_code(tmp_path: Path) -> None:
    same, changed = tmp_path / "same", tmp_path / "changed"
    for copy in (same, changed):
        shutil.copytree(Path(appliance.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    template = next(changed.rglob("*.j2"))
    template.write_text(template.read_text() + "\n")
    assert code_digest(same) == code_digest()
    assert code_digest(changed) != code_digest()
