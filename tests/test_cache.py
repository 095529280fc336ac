"""The content-keyed cache: entries appear whole or not at all; ls and clean."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import cli
from appliance.image.cache import COMPLETE, Cache, content_key


def test_key_is_stable_and_order_free() -> None:
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"a": 1}) != content_key({"a": 2})


def test_built_once_then_reused(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    calls = []

    def make(d: Path) -> dict[str, object]:
        calls.append(d)
        (d / "data").write_text("x")
        return {"note": "hi"}

    e1 = cache.get_or_build("thing", "k1", make)
    e2 = cache.get_or_build("thing", "k1", make)
    assert len(calls) == 1 and e1.path == e2.path and (e1.path / "data").read_text() == "x"
    assert e1.meta()["note"] == "hi"
    cache.get_or_build("thing", "k1", make, rebuild=True)
    assert len(calls) == 2


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path)

    def broken(d: Path) -> dict[str, object]:
        (d / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get_or_build("thing", "k2", broken)
    assert not cache.entry("thing", "k2").path.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_cli_ls_and_clean(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    for key in ("old", "new"):
        cache.get_or_build("thing", key, lambda d: {})
    past = time.time() - 10 * 86400
    os.utime(cache.entry("thing", "old").path / COMPLETE, (past, past))
    listed = json.loads(CliRunner().invoke(cli, ["cache", "ls", "--json", "--cache", str(tmp_path)]).stdout)
    assert {e["key"] for e in listed["entries"]} == {"old", "new"}
    result = CliRunner().invoke(cli, ["cache", "clean", "--older-than", "1", "--cache", str(tmp_path)])
    assert result.exit_code == 0 and "removed 1 entries" in result.output
    assert [e.key for e in cache.entries()] == ["new"]
    CliRunner().invoke(cli, ["cache", "clean", "--cache", str(tmp_path)])
    assert cache.entries() == []


def test_clean_removes_only_what_the_cache_made(tmp_path: Path) -> None:
    """`cache clean --cache DIR` on a directory that holds other things (a home directory, say)
    removes the cache's own entries and nothing else, whatever the names."""
    cache = Cache(tmp_path)
    cache.get_or_build("base", "0123456789abcdef0123", lambda d: {})
    theirs = [tmp_path / "my-photos", tmp_path / "base-0123456789abcdef9999", tmp_path / ".config-tmp-1"]
    for d in theirs:
        d.mkdir()
        (d / "keep.txt").write_text("mine")
    (tmp_path / "notes-2024.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["cache", "clean", "--cache", str(tmp_path)])
    assert result.exit_code == 0 and "removed 1 entries" in result.output, result.output
    assert all((d / "keep.txt").read_text() == "mine" for d in theirs)
    assert (tmp_path / "notes-2024.txt").exists()
    assert not (tmp_path / "base-0123456789abcdef0123").exists()


@pytest.mark.root
def test_a_failed_build_with_mounts_left_in_its_tree_is_removed(tmp_path: Path) -> None:
    """A build killed mid-way leaves what mmdebstrap mounted in the tree (/proc, /sys read-only):
    the cache detaches them before it removes the temporary directory, so the build's own error is
    what the caller sees, not rmtree's."""
    import shutil
    import subprocess

    def make(tmp: Path) -> dict[str, object]:
        for name in ("proc", "sys"):
            (tmp / "tree" / name).mkdir(parents=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(tmp / "tree" / name)], check=True)
        raise RuntimeError("mmdebstrap was killed")

    with pytest.raises(RuntimeError, match="mmdebstrap was killed"):
        Cache(tmp_path / "cache").get_or_build("base", "k", make)
    assert not list((tmp_path / "cache").glob(".base-k.tmp-*"))
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    # the control: rmtree alone stops at such a mount
    (tmp_path / "c" / "sys").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(tmp_path / "c" / "sys")], check=True)
    try:
        with pytest.raises(OSError):
            shutil.rmtree(tmp_path / "c")
    finally:
        subprocess.run(["umount", str(tmp_path / "c" / "sys")], check=True)
