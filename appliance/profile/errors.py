"""Profile errors: each names the file, line, column and field, what was given and what was expected."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError

Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """('wireguard', 'peers', 1, 'allowed_ips', 0) -> 'wireguard.peers[1].allowed_ips[0]'"""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def display_file(path: str) -> str:
    """Paths under the working directory are shown relative to it, the way editors link them."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else os.path.abspath(path)


@dataclass(frozen=True)
class Issue:
    file: str
    line: int  # 1-based; 0 when the file could not be read at all
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ProfileError(InputError):
    """Raised for any invalid profile; carries every issue found, in file order."""

    def __init__(self, issues: list[Issue]):
        self.issues = sorted(issues, key=lambda i: (i.file, i.line, i.column, i.path))
        super().__init__("\n".join(str(i) for i in self.issues))
