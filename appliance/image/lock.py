"""Lock files: the exact package versions (and SOURCE_DATE_EPOCH) of a build, so it can be repeated.

`appliance build --lock` writes profiles/NAME.lock after a build when none exists, and when one
exists pins every package to its version (apt preferences, Pin-Priority 1001) and checks the result.
A locked version the archive no longer carries is reported by name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import atomic_write
from .run import ImageError

LOCK_VERSION = 1


@dataclass(frozen=True)
class Lock:
    suite: str
    source_date_epoch: int
    packages: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> Lock:
        try:
            data = json.loads(path.read_text())
            if data.get("lock_version") != LOCK_VERSION:
                raise ValueError(f"lock_version {data.get('lock_version')!r}, expected {LOCK_VERSION}")
            return cls(str(data["suite"]), int(data["source_date_epoch"]), dict(data["packages"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ImageError(f"{path}: not a usable lock file ({e}); delete it to make a new one") from None

    def write(self, path: Path) -> None:
        data = {"lock_version": LOCK_VERSION, "suite": self.suite, "source_date_epoch": self.source_date_epoch,
                "packages": dict(sorted(self.packages.items()))}
        atomic_write(path, json.dumps(data, indent=1) + "\n")

    def apt_preferences(self) -> str:
        return "".join(f"Package: {name}\nPin: version {version}\nPin-Priority: 1001\n\n"
                       for name, version in sorted(self.packages.items()))

    def check(self, installed: dict[str, str]) -> None:
        wrong = [f"{name} {installed[name]} (locked {version})" for name, version in sorted(self.packages.items())
                 if name in installed and installed[name] != version]
        if wrong:
            raise ImageError("the archive no longer has the locked versions of: " + ", ".join(wrong[:10])
                             + (" ..." if len(wrong) > 10 else "") + "; refresh the lock with --update-lock")
