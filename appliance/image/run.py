"""The image stage's commands: the one runner (appliance.runner), with failures as ImageError and
every command and its output in the build log."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from ..runner import NULL_LOG, BuildLog, Command, CommandFailed
from ..runner import run as _run

__all__ = ["NULL_LOG", "BuildLog", "ImageError", "require_root", "run"]


class ImageError(CommandFailed):
    """A build failed: which step or command, and why."""


def run(cmd: Command, *, log: BuildLog = NULL_LOG, env: Mapping[str, str] | None = None, input: str | None = None,
        cwd: Path | None = None, what: str | None = None, check: bool = True,
        stdout: IO[bytes] | None = None) -> subprocess.CompletedProcess[str]:
    proc: subprocess.CompletedProcess[str] = _run(cmd, log=log, env=env, input=input, cwd=cwd, what=what,
                                                  check=check, stdout=stdout, error=ImageError)
    return proc


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(f"{why} needs root (mmdebstrap builds Debian trees as root): run it with sudo")
