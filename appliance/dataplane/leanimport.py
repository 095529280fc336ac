"""pyroute2 without its package __init__, which imports all of pyroute2 (NDB, its CLI, its test lab
and unittest.mock): ~0.1 s on a workstation, ~1-2 s at boot on a slow CPU or under emulation. The
dataplane imports the submodules it uses by their full names, so it runs the same either way.

pyroute2.lab, which IPRoute mixes in, is its documentation lab: a class that wraps every method in a
unittest.mock.MagicMock when the lab turns mocking on, and does nothing otherwise. Importing it costs
inspect and unittest.mock (0.5 s of the dataplane's 2 s start in the VM); the stub is what it is
with mocking off."""

from __future__ import annotations

import importlib.util
import sys
import types


def skip_pyroute2_init() -> None:
    """Make `pyroute2` a package whose __init__ has not run; its submodules import as usual. Call it
    before anything imports pyroute2 (the image's launcher and `python -m appliance.dataplane` do)."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed: the import error comes where pyroute2 is used
    sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)
    if "pyroute2.lab" not in sys.modules:
        lab = types.ModuleType("pyroute2.lab", "pyroute2's documentation lab, mocking off (appliance stub)")

        class LAB_API:  # noqa: N801 - pyroute2's name
            pass

        lab.LAB_API = LAB_API  # type: ignore[attr-defined]
        lab.registry = []  # type: ignore[attr-defined]
        lab.use_mock = False  # type: ignore[attr-defined]
        sys.modules["pyroute2.lab"] = lab
