"""Shared fixtures. Tests marked `root` need root (namespaces, nft -c): they skip for other users."""

from __future__ import annotations

import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest

from appliance.image.debian import REUSE_ENV
from appliance.secrets import ApplianceKeys, generate_preshared_key, generate_private_key

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "profiles"
EXAMPLES = sorted(
    [*PROFILES.glob("*.yaml"), *(PROFILES / "fleet" / "sites").glob("*.yaml")], key=lambda p: p.name
)


def pytest_configure(config: pytest.Config) -> None:
    # The suite tests this code, not the archive's latest upload: on a warm cache, a root tree up to
    # 14 days older than the archive's current state is reused instead of rebuilding every tree
    # (~30 min here) whenever a security update lands. A fresh cache builds from the current state.
    os.environ.setdefault(REUSE_ENV, "14")

    # A terminated run (CI timeout, kill) unwinds like Ctrl-C, so fixtures still remove the namespaces,
    # processes, TAPs and loop devices they made.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, nft, mounts)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def require_tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/lib/systemd/{name}") if os.path.exists(p)), None)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make setup` (it installs the Debian tools the tests use)")
    return path


@pytest.fixture(scope="session")
def fixed_keys() -> ApplianceKeys:
    """One key set for the whole run, so renders can be compared byte for byte."""
    return ApplianceKeys(generate_private_key(), {"phone": generate_preshared_key()})


class EmulatorRetry(UserWarning):
    """The lab ran a boot again, or power-cycled one, for the emulator's fault, not the image's."""


def warn_retries(name: str, consoles: list[str], resets: list[str] | None = None) -> None:
    """A passing test's warnings reach CI's log (its output is captured): how often the lab had to
    retry or power-cycle a boot, and what the kernel said (verify.boot.emulator_fault)."""
    from appliance.verify.boot import emulator_fault

    for console in consoles:
        warnings.warn(f"{name}: a boot ran again: {emulator_fault(console) or console[-200:]}", EmulatorRetry,
                      stacklevel=2)
    if resets:
        warnings.warn(f"{name}: hung boots power-cycled (VM.unstick_reboots): {'; '.join(resets)}", EmulatorRetry,
                      stacklevel=2)
