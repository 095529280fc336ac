"""An image's source commit, and which way an update goes in history: a real git repository with a
branch, no device (the refusal on a device runs in tests/test_update.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from appliance.image.provenance import Source, downgrade, source_of


def git(repo: Path, *args: str, date: int | None = None) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": "/usr/bin:/bin", "HOME": str(repo)}
    if date is not None:
        env["GIT_COMMITTER_DATE"] = env["GIT_AUTHOR_DATE"] = f"{date} +0000"
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> dict[str, Source]:
    """c1 -> c2 on main, c3 from c1 on a branch; main checked out."""
    git(tmp_path, "init", "-q", "-b", "main")
    profile = tmp_path / "edge.yaml"
    commits = {}
    for name, date in (("c1", 1_800_000_000), ("c2", 1_800_000_100)):
        profile.write_text(f"# {name}\n")
        git(tmp_path, "add", "edge.yaml")
        git(tmp_path, "commit", "-q", "-m", name, date=date)
        commits[name] = Source(git(tmp_path, "rev-parse", "HEAD"), date, False)
    git(tmp_path, "checkout", "-q", "-b", "other", commits["c1"].commit)
    profile.write_text("# c3\n")
    git(tmp_path, "commit", "-q", "-am", "c3", date=1_800_000_200)
    commits["c3"] = Source(git(tmp_path, "rev-parse", "HEAD"), 1_800_000_200, False)
    git(tmp_path, "checkout", "-q", "main")
    return commits


def test_an_image_names_the_commit_its_profile_was_built_from(repo: dict[str, Source], tmp_path: Path) -> None:
    profile = tmp_path / "edge.yaml"
    assert source_of([profile]) == repo["c2"]
    profile.write_text("# edited\n")
    assert source_of([profile]) == Source(repo["c2"].commit, repo["c2"].time, dirty=True)
    outside = tmp_path.parent / f"{tmp_path.name}-nogit"
    outside.mkdir()
    (outside / "edge.yaml").write_text("#\n")
    assert source_of([outside / "edge.yaml"]) is None


def test_going_back_in_history_is_a_downgrade(repo: dict[str, Source], tmp_path: Path) -> None:
    c1, c2, c3 = repo["c1"], repo["c2"], repo["c3"]
    assert downgrade(c1, c2, tmp_path) is None  # forward
    assert downgrade(c2, c2, tmp_path) is None  # the same commit (a rebuild, a retry)
    back = downgrade(c2, c1, tmp_path)
    assert back and "newer than this image's" in back and c2.commit[:12] in back and c1.commit[:12] in back
    sideways = downgrade(c2, c3, tmp_path)  # c3 is later, but not on top of what the device runs
    assert sideways and "not in the history" in sideways
    # a commit this checkout has never seen: by time
    unknown = Source("f" * 40, c2.time + 50, False)
    assert downgrade(unknown, c2, tmp_path) and downgrade(unknown, c3, tmp_path) is None
    # nothing to compare: an image from outside git, or from before sources
    assert downgrade(None, c1, tmp_path) is None and downgrade(c2, None, tmp_path) is None


@pytest.mark.parametrize("raw", [None, "abc", {"commit": "x" * 40, "time": 1, "dirty": False},
                                 {"commit": "a" * 40, "time": "1", "dirty": False},
                                 {"commit": "a" * 39, "time": 1, "dirty": False},
                                 {"commit": "a" * 40, "time": 1, "dirty": "no"}])
def test_a_source_from_a_device_is_checked(raw: object) -> None:
    assert Source.from_json(raw) is None
    assert Source.from_json({"commit": "a" * 40, "time": 1, "dirty": False}) == Source("a" * 40, 1, False)


def test_a_repositorys_fsmonitor_is_not_run(repo: dict[str, Source], tmp_path: Path) -> None:
    """`git status` runs core.fsmonitor's program; the repository's config must not get a build to."""
    planted = tmp_path / "ran"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ntouch {planted}\n")
    hook.chmod(0o755)
    git(tmp_path, "config", "core.fsmonitor", str(hook))
    subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain"], capture_output=True)  # control: it runs
    assert planted.exists()
    planted.unlink()
    assert source_of([tmp_path / "edge.yaml"]) == repo["c2"]
    assert not planted.exists()
