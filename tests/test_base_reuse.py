"""Which cached base tree a build takes: the one of the archive's current state; offline, or within
APPLIANCE_REUSE_BASE_DAYS, the newest one this recipe built for this spec from an older state; never
one of another recipe or spec. Real cache entries in a temporary directory, no mmdebstrap."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.errors import EXIT_INVALID, InputError
from appliance.image import Cache, builder, image_spec
from appliance.image.cache import COMPLETE, CacheKind
from appliance.image.debian import REUSE_ENV, Archive, ArchiveState, reuse_window
from appliance.image.rootfs import base_key, newest_base
from appliance.image.run import NULL_LOG, ImageError
from appliance.image.spec import ImageSpec
from appliance.profile import load_profile
from conftest import PROFILES

SDE = 1735689600
OLD, NOW = "Mon, 01 Jan 2026 | a | b", "Wed, 02 Dec 2026 | c | d"
DAY = 86400.0


@dataclass(frozen=True)
class FixedArchive(Archive):
    """The real sources, with the archive's state given instead of fetched."""

    mirror: str = "http://deb.debian.org/debian"
    security: str = "http://deb.debian.org/debian-security"
    state: str | None = None

    def snapshot(self, timeout: float = 10.0) -> str | None:
        return self.state


@pytest.fixture(scope="module")
def spec() -> ImageSpec:
    return image_spec(load_profile(PROFILES / "exit-node.yaml").profile)


def add_base(cache: Cache, key: str, snapshot: str, age_days: float) -> str:
    def make(tmp: Path) -> dict[str, Any]:
        (tmp / "tree").mkdir()
        return {"packages": {}, "kernel_version": "k", "snapshot": snapshot}

    entry = cache.get_or_build(CacheKind.BASE, key, make)
    made_ago(entry.path, age_days)
    return key


def made_ago(entry: Path, days: float) -> None:
    meta = json.loads((entry / COMPLETE).read_text())
    (entry / COMPLETE).write_text(json.dumps({**meta, "created": time.time() - days * DAY}))


def key_for(spec: ImageSpec, snapshot: str) -> str:
    return base_key(spec, FixedArchive(), snapshot, None, SDE)


def test_the_newest_tree_of_this_recipe_is_found_whatever_its_snapshot(tmp_path: Path, spec: ImageSpec) -> None:
    cache = Cache(tmp_path)
    archive = FixedArchive()
    older = add_base(cache, key_for(spec, "older"), "older", 9)
    newer = add_base(cache, key_for(spec, OLD), OLD, 3)
    # the controls: a tree of another recipe (its key is not what these inputs give with its snapshot),
    # and one of another spec, both newer
    add_base(cache, "0" * 20, OLD, 1)
    other = image_spec(load_profile(PROFILES / "subnet-router.yaml").profile)
    assert other.base_inputs() != spec.base_inputs()
    add_base(cache, key_for(other, OLD), OLD, 0)
    found = newest_base(cache, spec, archive, SDE)
    assert found is not None and found.entry.key == newer
    found = newest_base(cache, spec, archive, SDE, max_age=5 * DAY)
    assert found is not None and found.entry.key == newer
    assert newest_base(cache, spec, archive, SDE, max_age=2 * DAY) is None
    assert newest_base(cache, spec, archive, SDE + 1) is None  # another SOURCE_DATE_EPOCH: another tree
    assert older != newer


def step(cache: Cache, spec: ImageSpec, state: str | None, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the build's base step: the key of the cached tree it took, or "built from STATE" where it
    went to build_base (which builds, or finds that state's own tree in the cache)."""
    def build_base(cache: Cache, tools: object, archive: Archive, spec: ImageSpec, log: object, *,
                   snapshot: str | None, **kw: object) -> str:
        return f"built from {snapshot}"

    monkeypatch.setattr(builder, "build_base", build_base)
    ctx = SimpleNamespace(opts=SimpleNamespace(cache=cache, no_cache=False), lock=None,
                          archive=FixedArchive(state=state), spec=spec, sde=SDE, log=NULL_LOG,
                          reuse_window=reuse_window(), archive_state=ArchiveState(state, reuse_window()),
                          need=lambda value, what: value, tools=None, base=None)
    builder._base(ctx)  # type: ignore[arg-type]
    return ctx.base if isinstance(ctx.base, str) else ctx.base.entry.key


def test_the_build_takes_an_older_state_only_when_allowed(tmp_path: Path, spec: ImageSpec,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path)
    old = add_base(cache, key_for(spec, OLD), OLD, 3)
    monkeypatch.delenv(REUSE_ENV, raising=False)
    assert step(cache, spec, NOW, monkeypatch) == f"built from {NOW}"  # the archive moved: built anew
    monkeypatch.setenv(REUSE_ENV, "2")
    assert step(cache, spec, NOW, monkeypatch) == f"built from {NOW}"  # older than the window
    monkeypatch.setenv(REUSE_ENV, "14")
    assert step(cache, spec, NOW, monkeypatch) == old
    monkeypatch.setenv(REUSE_ENV, "0")
    assert step(cache, spec, None, monkeypatch) == old  # offline: any age
    # the current state's own tree wins over the older one, whatever the window
    add_base(cache, key_for(spec, NOW), NOW, 20)
    monkeypatch.setenv(REUSE_ENV, "14")
    assert step(cache, spec, NOW, monkeypatch) == f"built from {NOW}"


def test_offline_with_nothing_cached_says_so(tmp_path: Path, spec: ImageSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    add_base(Cache(tmp_path), "0" * 20, OLD, 0)  # another recipe's tree is not taken
    with pytest.raises(ImageError, match="cannot reach the Debian archive"):
        step(Cache(tmp_path), spec, None, monkeypatch)


@pytest.mark.parametrize("raw,seconds", [("", 0), ("0", 0), ("14", 14 * DAY), (" 0.5 ", DAY / 2)])
def test_reuse_window_reads_days(raw: str, seconds: float) -> None:
    assert reuse_window({REUSE_ENV: raw}) == seconds
    assert reuse_window({}) == 0


@pytest.mark.parametrize("raw", ["-1", "two weeks", "nan", "inf", "10000"])
def test_reuse_window_refuses_what_is_not_days(raw: str) -> None:
    with pytest.raises(InputError, match=f"{REUSE_ENV}=.*from 0 up to 10,000") as e:
        reuse_window({REUSE_ENV: raw})
    assert e.value.exit_code == EXIT_INVALID
    assert reuse_window({REUSE_ENV: "9999"}) == 9999 * DAY  # the control: just below the bound


@pytest.mark.parametrize("raw,epoch", [("", builder.DEFAULT_SOURCE_DATE_EPOCH), ("1700000000", 1700000000),
                                       (" 1 ", 1)])
def test_source_date_epoch_reads_seconds(raw: str, epoch: int) -> None:
    assert builder.source_date_epoch({"SOURCE_DATE_EPOCH": raw}) == epoch


@pytest.mark.parametrize("raw", ["abc", "-5", "0", "1.5", "1e9", "\u0661\u0662", "99999999999"])
def test_source_date_epoch_refuses_what_is_not_seconds(raw: str) -> None:
    with pytest.raises(InputError, match="SOURCE_DATE_EPOCH=.*whole number"):
        builder.source_date_epoch({"SOURCE_DATE_EPOCH": raw})


@pytest.mark.parametrize("var,raw", [(REUSE_ENV, "abc"), ("SOURCE_DATE_EPOCH", "abc")])
def test_a_bad_environment_stops_the_build_before_any_step(var: str, raw: str, tmp_path: Path, spec: ImageSpec,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Read once when the build's context is made (exit 2), not at the step that needs it (exit 1)."""
    opts = builder.BuildOptions(out_dir=tmp_path / "out", cache=Cache(tmp_path / "cache"))
    monkeypatch.setenv(var, raw)
    with pytest.raises(InputError, match=var):
        builder._context(spec, None, None, opts, None, NULL_LOG)  # type: ignore[arg-type]
    monkeypatch.delenv(var)  # the control: the same call without it makes the context
    assert builder._context(spec, None, None, opts, None, NULL_LOG).sde > 0  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()  # nothing written either way


def test_trees_made_from_the_archive_follow_it(tmp_path: Path) -> None:
    """The tools tree (whose systemd-boot and UKI stub the host's images boot with) and another
    architecture's unpacked packages are made again when the archive moves, as base trees are; an
    older state's only within the window, or offline. Keyed without the state (as they were), the
    first tree ever made would stay in use after every security update (the control)."""
    from appliance.image.tools import from_archive, tools_key

    cache = Cache(tmp_path)
    made: list[str | None] = []

    def take(key_for: Callable[[str | None], str], state: ArchiveState, days_ago: float = 0) -> str:
        def make(tmp: Path) -> dict[str, object]:
            made.append(state.snapshot)
            return {}
        entry = from_archive(cache, CacheKind.TOOLS, key_for, state, make, NULL_LOG)
        if made and made[-1] == state.snapshot and days_ago:
            made_ago(entry.path, days_ago)
        return entry.key

    def key_for(snapshot: str | None) -> str:
        return tools_key(FixedArchive(state=None), snapshot)

    first = take(key_for, ArchiveState(OLD), days_ago=30)
    assert take(key_for, ArchiveState(OLD)) == first and made == [OLD]  # the same state: cached
    moved = take(key_for, ArchiveState(NOW), days_ago=3)
    assert moved != first and made == [OLD, NOW]  # the archive moved: made anew
    assert take(key_for, ArchiveState(None)) == moved  # offline: the newest
    assert take(key_for, ArchiveState("later", window=14 * DAY)) == moved and made == [OLD, NOW]  # in the window
    assert take(key_for, ArchiveState("later", window=2 * DAY)) != moved and made == [OLD, NOW, "later"]
    assert take(key_for, ArchiveState("later")) not in (first, moved) and made == [OLD, NOW, "later"]
    # the control: one key for every state hands out the first tree whatever the archive did since
    assert take(lambda s: "stale", ArchiveState(OLD)) == take(lambda s: "stale", ArchiveState(NOW)) == "stale"
    assert made[-1] == OLD and made.count(NOW) == 1
