"""atomic_write: the mode from the first byte, the whole content or none."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from appliance.fsutil import atomic_write


def test_mode_from_the_first_byte_and_no_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real_fdopen = os.fdopen

    def spy(fd: int, *args: object, **kwargs: object) -> object:  # the mode when the first byte is written
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_fdopen(fd, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "fdopen", spy)
    target = tmp_path / "secret.key"
    atomic_write(target, "k\n", 0o600)
    assert seen == [0o600] and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text() == "k\n" and [p.name for p in tmp_path.iterdir()] == ["secret.key"]


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("old")

    class Boom(Exception):
        pass

    class Exploding(str):
        def encode(self, *a: object, **k: object) -> bytes:
            raise Boom

    with pytest.raises(Boom):
        atomic_write(target, Exploding("new"))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]
