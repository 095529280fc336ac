"""Lock files: pins as apt preferences, mismatches named, unusable files reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.image.lock import Lock
from appliance.image.run import ImageError


def test_round_trip_and_preferences(tmp_path: Path) -> None:
    lock = Lock("trixie", 1735689600, {"systemd": "257.13-1~deb13u1", "nftables": "1.1.3-1"})
    lock.write(tmp_path / "x.lock")
    again = Lock.read(tmp_path / "x.lock")
    assert again == lock
    prefs = again.apt_preferences()
    assert "Package: nftables\nPin: version 1.1.3-1\nPin-Priority: 1001\n" in prefs
    assert prefs.index("nftables") < prefs.index("systemd")


def test_mismatch_names_the_packages() -> None:
    lock = Lock("trixie", 1, {"systemd": "257.13-1~deb13u1", "nftables": "1.1.3-1"})
    lock.check({"systemd": "257.13-1~deb13u1", "nftables": "1.1.3-1", "extra": "1"})
    with pytest.raises(ImageError, match=r"nftables 1.1.4-1 \(locked 1.1.3-1\)"):
        lock.check({"systemd": "257.13-1~deb13u1", "nftables": "1.1.4-1"})


@pytest.mark.parametrize("text", ["", "{}", '{"lock_version": 99}', '{"lock_version": 1, "suite": "trixie"}'])
def test_unusable_lock(tmp_path: Path, text: str) -> None:
    f = tmp_path / "x.lock"
    f.write_text(text)
    with pytest.raises(ImageError, match="not a usable lock file"):
        Lock.read(f)
