"""Where an image's configuration came from in git, and whether one image is older than another.

An image records the commit of the repository its profile was built from ("source" in release.json
and in the manifest). `appliance update` compares the device's with the new image's and refuses to
go back in history (a downgrade) unless told to: by ancestry when this checkout knows both commits,
else by commit time. A profile outside git has no source, and then there is nothing to compare."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runner import CommandFailed, run


@dataclass(frozen=True)
class Source:
    commit: str
    time: int  # the commit's committer time (seconds since the epoch)
    dirty: bool  # the profile's files differ from the commit

    def to_json(self) -> dict[str, Any]:
        return {"commit": self.commit, "time": self.time, "dirty": self.dirty}

    @classmethod
    def from_json(cls, raw: Any) -> Source | None:
        """None for anything that is not a source (an image from before sources, a device's garbage)."""
        if not isinstance(raw, dict):
            return None
        commit, time, dirty = raw.get("commit"), raw.get("time"), raw.get("dirty")
        if not (isinstance(commit, str) and len(commit) in (40, 64) and all(c in "0123456789abcdef" for c in commit)
                and isinstance(time, int) and isinstance(dirty, bool)):
            return None
        return cls(commit, time, dirty)

    def describe(self) -> str:
        when = datetime.datetime.fromtimestamp(self.time, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"commit {self.commit[:12]} ({when}{', with uncommitted changes' if self.dirty else ''})"


def _git(repo: Path, *args: str) -> tuple[int, str]:
    # core.fsmonitor names a program that `git status` would run: a repository's own config must not
    # make a build run it
    try:
        proc = run(["git", "-c", "core.fsmonitor=false", "-C", repo, *args], check=False, timeout=30)
    except CommandFailed:  # no git: no source
        return 127, ""
    return proc.returncode, proc.stdout.strip()


def source_of(files: Sequence[Path]) -> Source | None:
    """The commit checked out where the profile (files[0], then the files it extends) lives; None
    outside a git repository."""
    if not files:
        return None
    repo = files[0].resolve().parent
    rc, head = _git(repo, "rev-parse", "--verify", "--quiet", "HEAD")
    if rc != 0 or not head:
        return None
    rc, time = _git(repo, "log", "-1", "--format=%ct", head)
    rc2, changed = _git(repo, "status", "--porcelain", "--", *(str(f.resolve()) for f in files))
    if rc != 0 or rc2 != 0 or not time.isdigit():
        return None
    return Source(head, int(time), bool(changed))


def downgrade(running: Source | None, new: Source | None, repo: Path | None) -> str | None:
    """Why installing new over running would go back in history, or None when it would not (or
    when either has no source)."""
    if running is None or new is None or running.commit == new.commit:
        return None
    if repo is not None:
        rc, _ = _git(repo, "merge-base", "--is-ancestor", running.commit, new.commit)
        if rc == 0:
            return None
        if rc == 1:  # both known; running is not in new's history
            rc_back, _ = _git(repo, "merge-base", "--is-ancestor", new.commit, running.commit)
            if rc_back == 0:
                return f"the device runs {running.describe()}, newer than this image's {new.describe()}"
            return (f"the device runs {running.describe()}, which is not in the history of this image's "
                    f"{new.describe()} (another branch?)")
    if new.time < running.time:  # this checkout does not know the device's commit
        return f"the device runs {running.describe()}, later than this image's {new.describe()}"
    return None
