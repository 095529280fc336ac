"""Tier 2: the testinfra suite tree_suite.py, run with the chroot backend against a staged root tree.

It runs as a separate pytest process so the build's own process and pytest's state stay apart; the
expectations (rendered files, units, packages, key paths) travel in a JSON file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .suite import SuiteResult, run_suite

SUITE = Path(__file__).with_name("tree_suite.py")
EXPECT_ENV = "APPLIANCE_EXPECT"


TreeVerification = SuiteResult


def verify_tree(tree: Path, expect: dict[str, Any], workdir: Path) -> SuiteResult:
    workdir.mkdir(parents=True, exist_ok=True)
    expect_file = workdir / "expect.json"
    expect_file.write_text(json.dumps(expect, indent=1))
    return run_suite(SUITE, workdir, str(tree), env={EXPECT_ENV: str(expect_file), **expect.get("emulator_env", {})},
                     args=("--connection=chroot",))
