"""Fleets: check across profiles, diffs between git revisions (keys never read), fleet builds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import cli
from appliance.fleet import devices
from conftest import PROFILES, REPO


def test_bases_are_not_devices() -> None:
    found, bases = devices(PROFILES / "fleet")
    assert [p.name for p in found] == ["ams.yaml", "fra.yaml"] and [p.name for p in bases] == ["base.yaml"]


def test_example_fleet_checks() -> None:
    result = CliRunner().invoke(cli, ["fleet", "check", "--json", str(PROFILES / "fleet")])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(result.stdout)["devices"]) == ["site-ams", "site-fra"]


def test_all_examples_are_one_consistent_fleet() -> None:
    assert CliRunner().invoke(cli, ["fleet", "check", str(PROFILES)]).exit_code == 0


def test_cross_profile_clashes(tmp_path: Path) -> None:
    shutil.copytree(PROFILES / "fleet", tmp_path / "fleet")
    fra = tmp_path / "fleet/sites/fra.yaml"
    text = fra.read_text().replace("name: site-fra", "name: site-ams").replace("100.64.100.20/32", "100.64.100.10/32")
    fra.write_text(text.replace("endpoint: fra.example.net:51820", (
        "endpoint: ams.example.net:51820\n  peers:\n    - {name: noc, public_key: "
        "bcZjDEJDw0GrFhwIcsNVVp7ZP6lqfbJdYMtZEZC+Cz0=, allowed_ips: [100.64.100.2/32]}")))
    result = CliRunner().invoke(cli, ["fleet", "check", "--json", str(tmp_path / "fleet")])
    assert result.exit_code == 2
    messages = " | ".join(i["message"] for i in json.loads(result.stdout)["issues"])
    assert "name 'site-ams' is also used by site-ams" in messages
    assert "tunnel address 100.64.100.10 is also used" in messages
    assert "endpoint ams.example.net:51820 is also used" in messages
    assert "peer 'noc' has another public key" in messages


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"})


def _fleet_repo(repo: Path) -> Path:
    """The example fleet, committed to a new git repository."""
    shutil.copytree(PROFILES / "fleet", repo)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "fleet")
    return repo


def test_diff_between_revisions(tmp_path: Path) -> None:
    repo = _fleet_repo(tmp_path / "fleet-repo")
    ams = repo / "sites/ams.yaml"
    ams.write_text(ams.read_text().replace("advertise_routes: [10.10.0.0/24]", "advertise_routes: [10.10.0.0/23]")
                   .replace("10.10.0.1/24", "10.10.0.1/23"))
    fra = repo / "sites/fra.yaml"
    fra.write_text(fra.read_text().replace("name: site-fra", "name: site-fra\nsystem: {packages: [tcpdump, mtr-tiny]}"))
    _git(repo, "commit", "-qam", "bigger LAN in ams; mtr on fra")
    result = CliRunner().invoke(cli, ["fleet", "diff", "HEAD~1", "HEAD", "--repo", str(repo)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "### site-ams" in out and "+Address=10.10.0.1/23" in out and "10.10.0.0/23" in out
    assert "site-ams" in out and "configuration" in out
    assert "packages and configuration" in out  # fra: a new package means a new root tree
    assert "<redacted key>" not in out  # keys are placeholders on both sides: no change to show
    stat = CliRunner().invoke(cli, ["fleet", "diff", "HEAD~1", "HEAD", "--repo", str(repo), "--stat"]).stdout
    assert "###" not in stat and "site-ams" in stat


def test_diff_sees_a_board_change_that_keeps_the_root_tree(tmp_path: Path) -> None:
    """generic -> rpi4 on arm64 keeps the base tree (test_rpi) but not the image: still a change."""
    repo = _fleet_repo(tmp_path / "fleet-repo")
    fra = repo / "sites/fra.yaml"
    fra.write_text(fra.read_text().replace("name: site-fra", "name: site-fra\nsystem: {arch: arm64}"))
    _git(repo, "commit", "-qam", "fra on arm64")
    fra.write_text(fra.read_text().replace("system: {arch: arm64}", "system: {arch: arm64, board: rpi4}"))
    _git(repo, "commit", "-qam", "fra on a Pi")
    result = CliRunner().invoke(cli, ["fleet", "diff", "HEAD~1", "HEAD", "--repo", str(repo), "--stat"])
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") == 4}
    assert "changed" in rows["site-fra"] and "boot files and configuration" in rows["site-fra"], result.stdout
    assert "unchanged" in rows["site-ams"], result.stdout  # control


def test_diff_unknown_revision(tmp_path: Path) -> None:
    repo = _fleet_repo(tmp_path / "r")
    result = CliRunner().invoke(cli, ["fleet", "diff", "nope", "HEAD", "--repo", str(repo)])
    assert result.exit_code == 1 and "nope" in result.output


def test_pre_commit_hook_refuses_a_broken_fleet(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(PROFILES / "fleet", repo)
    _git(repo, "init", "-q")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    hook = REPO / "contrib/pre-commit"
    ok = subprocess.run([str(hook)], cwd=repo, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (repo / "sites/ams.yaml").write_text((repo / "sites/ams.yaml").read_text().replace("listen_port", "listen_prot"))
    bad = (repo / "base.yaml")
    bad.write_text(bad.read_text().replace("listen_port: 51820", "listen_prot: 51820"))
    refused = subprocess.run([str(hook)], cwd=repo, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "did you mean 'listen_port'" in refused.stderr


@pytest.mark.root
@pytest.mark.slow
def test_fleet_build_continues_past_a_failure(tmp_path: Path) -> None:
    shutil.copytree(PROFILES / "fleet", tmp_path / "fleet")
    broken = tmp_path / "fleet/sites/zzz.yaml"
    broken.write_text((tmp_path / "fleet/sites/fra.yaml").read_text().replace("site-fra", "site-zzz")
                      .replace("100.64.100.20", "100.64.100.30").replace("fra.example", "zzz.example")
                      .replace("name: site-zzz", "name: site-zzz\nsystem: {packages: [no-such-package-xyz]}"))
    cache = os.environ.get("APPLIANCE_TEST_CACHE") or str(Path.home() / ".cache" / "appliance-tests")
    proc = subprocess.run([sys.executable, "-m", "appliance", "fleet", "build", str(tmp_path / "fleet"), "--out-dir",
                           str(tmp_path / "images"), "--secrets", str(tmp_path / "secrets"), "--cache", cache],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "no-such-package-xyz" in proc.stderr
    assert (tmp_path / "images/site-ams.img").exists() and (tmp_path / "images/site-fra.img").exists()
    assert not (tmp_path / "images/site-zzz.img").exists()
    assert "site-ams" in proc.stdout and "failed" in proc.stdout
    # the private keys of the fleet appear in no log, manifest or output
    keys = [f.read_text().strip() for f in (tmp_path / "secrets").rglob("*.key")]
    assert len(keys) >= 2
    texts = [p.read_text() for p in (tmp_path / "images").glob("*") if p.suffix in (".json", ".log")]
    texts += [proc.stdout, proc.stderr]
    assert not any(k in t for k in keys for t in texts)


@pytest.mark.parametrize("command", ["check", "build"])
def test_a_fleet_without_devices_is_an_error(tmp_path: Path, command: str) -> None:
    """A directory without profiles (a mistyped one, one holding only other files) or a device file
    such as /dev/null is not an empty fleet that passes: exit 2 and why. The example fleet passes
    (control)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/notes.txt").write_text("no profile here\n")
    for where, why in ((tmp_path / "empty", "no device profiles"), ("/dev/null", "not a directory")):
        result = CliRunner().invoke(cli, ["fleet", command, str(where)])
        assert result.exit_code == 2 and why in result.output, result.output
    assert CliRunner().invoke(cli, ["fleet", "check", str(PROFILES / "fleet")]).exit_code == 0
