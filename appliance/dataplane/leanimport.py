"""pyroute2 without its package __init__, which imports all of pyroute2 (NDB, its CLI, its test lab
and unittest.mock): ~0.1 s on a workstation, ~1-2 s at boot on a slow CPU or under emulation. The
dataplane imports the submodules it uses by their full names, so it runs the same either way."""

from __future__ import annotations

import importlib.util
import sys


def skip_pyroute2_init() -> None:
    """Make `pyroute2` a package whose __init__ has not run; its submodules import as usual. Call it
    before anything imports pyroute2 (the image's launcher and `python -m appliance.dataplane` do)."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed: the import error comes where pyroute2 is used
    sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
