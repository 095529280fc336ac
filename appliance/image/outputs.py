"""The build's outputs beside the image: .zst, .bmap (bmaptool) and the manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .assemble import private_file
from .run import BuildLog, run


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def compress(img: Path, out: Path, log: BuildLog) -> None:
    """The image, compressed into a file that is 0600 from its first byte (zstd would create it with
    the usual mode and copy the image's only at the end)."""
    with open(private_file(out), "wb") as f:
        run(["zstd", "-q", "-c", "-T0", "-9", "--no-progress", img], log=log, what="zstd", stdout=f)


def bmap(img: Path, out: Path, log: BuildLog) -> None:
    run(["bmaptool", "create", "-o", out, img], log=log, what="bmaptool create")


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
