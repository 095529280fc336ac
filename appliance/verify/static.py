"""Tier 2: the testinfra suite tree_suite.py, run with the chroot backend against a staged root tree.

It runs as a separate pytest process so the build's own process and pytest's state stay apart; the
expectations (rendered files, units, packages, key paths) travel in a JSON file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUITE = Path(__file__).with_name("tree_suite.py")
EXPECT_ENV = "APPLIANCE_EXPECT"


@dataclass(frozen=True)
class TreeVerification:
    passed: int
    failed: int
    failures: list[str]
    output: str

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.passed > 0


def verify_tree(tree: Path, expect: dict[str, Any], workdir: Path) -> TreeVerification:
    workdir.mkdir(parents=True, exist_ok=True)
    expect_file = workdir / "expect.json"
    expect_file.write_text(json.dumps(expect, indent=1))
    ini = workdir / "pytest.ini"
    ini.write_text("[pytest]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(SUITE), "-q", "-rf", "-p", "no:cacheprovider", "-c", str(ini),
         "--rootdir", str(workdir), f"--hosts={tree}", "--connection=chroot", "--color=no"],
        capture_output=True, text=True, env={**_env(), EXPECT_ENV: str(expect_file)})
    out = proc.stdout + proc.stderr
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", out)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) (failed|error)", out)) else 0
    if proc.returncode not in (0, 1) and not failed:
        failed = 1
    failures = re.findall(r"^FAILED \S*?::(\w+)", out, re.M)  # bare test names, without the host parameter
    return TreeVerification(passed, failed, failures, out)


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
