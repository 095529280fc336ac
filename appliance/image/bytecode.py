"""Python bytecode for a root tree, made by the tools tree's python: the same version from the same
suite (debian.PYTHON), running natively whatever the tree's architecture, since bytecode does not
depend on the CPU. Hash-checked files hold no timestamps, and a fixed hash seed orders constant sets
the same way each build; each file is named as the image has it, not as the build saw it."""

from __future__ import annotations

from pathlib import Path

from .debian import PYTHON
from .run import BuildLog
from .tools import ToolsTree


def compile_bytecode(tools: ToolsTree, tree: Path, dirs: list[str], log: BuildLog, what: str) -> None:
    """Compile every .py below each of dirs (paths inside the tree) that exists."""
    found = [tree / d for d in dirs if (tree / d).is_dir()]
    if found:
        tools.run([f"python{PYTHON}", "-m", "compileall", "-q", "-f", "-j0", "--invalidation-mode", "checked-hash",
                   "-s", tree, "-p", "/", *found], binds=[tree], log=log, env={"PYTHONHASHSEED": "0"},
                  what=f"compileall ({what})")
