"""Running the external tools the image stages drive, with their output kept in a build log.

Every subprocess goes through run(): the command and its output are appended to the log, and a
failure becomes an ImageError carrying the last lines of output, never a traceback."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from ..ui import ApplianceError


class ImageError(ApplianceError):
    pass


class BuildLog:
    """Appends every command and its output to one file; the build prints its path on failure."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, text: str) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8", errors="replace") as f:
                f.write(text)


NULL_LOG = BuildLog(None)


def run(cmd: Sequence[str | os.PathLike[str]], *, log: BuildLog = NULL_LOG, env: Mapping[str, str] | None = None,
        input: str | None = None, cwd: Path | None = None, what: str | None = None,
        check: bool = True, stdout: IO[bytes] | None = None) -> subprocess.CompletedProcess[str]:
    """stdout: a file the command's output goes to (binary), instead of the log."""
    args = [str(c) for c in cmd]
    full_env = {**os.environ, **(env or {})}
    t0 = time.monotonic()
    log.write(f"\n$ {shlex.join(args)}" + (" > FILE" if stdout is not None else "") + "\n")
    try:
        proc = subprocess.run(args, env=full_env, input=input, cwd=cwd, text=True, errors="replace",
                              stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE)
        if stdout is not None:
            proc.stdout = ""
    except FileNotFoundError:
        raise ImageError(f"{args[0]} is not installed (run `make setup`)") from None
    log.write(proc.stdout + proc.stderr + f"[exit {proc.returncode} after {time.monotonic() - t0:.1f} s]\n")
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        where = f" (full log: {log.path})" if log.path else ""
        raise ImageError(f"{what or args[0]} failed with exit status {proc.returncode}{where}:\n{tail}")
    return proc


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(f"{why} needs root (mmdebstrap builds Debian trees as root): run it with sudo")
