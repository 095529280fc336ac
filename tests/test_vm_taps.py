"""The lab hands QEMU its TAPs open, wherever the lab has moved them, so a VM can be power-cycled
(killed and started again) while the lab's addresses and servers stay on its NICs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from appliance.verify.netns import Lab
from appliance.verify.vm import VMError, open_tap

pytestmark = pytest.mark.root


def _flags(ns: str, name: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", name], check=True, capture_output=True, text=True)
    return out.stdout.split("<", 1)[1].split(">", 1)[0].split(",")


def test_a_tap_moved_into_a_namespace_is_opened_there() -> None:
    lab = Lab("v")
    home = Path("/proc/thread-self/ns/net").stat().st_ino
    try:
        ns = lab.ns("wan")
        tap = f"aplv{os.getpid() % 10000}"
        subprocess.run(["ip", "tuntap", "add", tap, "mode", "tap", "vnet_hdr"], check=True)
        subprocess.run(["ip", "link", "set", tap, "netns", ns, "name", "tapu"], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "tapu", "up"], check=True)
        assert "LOWER_UP" not in _flags(ns, "tapu")  # nobody holds it yet
        fd = open_tap(ns, "tapu")
        try:
            assert "LOWER_UP" in _flags(ns, "tapu")  # this open is its queue
            assert Path("/proc/thread-self/ns/net").stat().st_ino == home  # and this thread came back
        finally:
            os.close(fd)
        assert "LOWER_UP" not in _flags(ns, "tapu")
        # control: a name the namespace does not have is refused, not made anew (an unconnected NIC)
        with pytest.raises(VMError, match="no TAP tapx"):
            open_tap(ns, "tapx")
        with pytest.raises(VMError, match="no TAP tapu here"):
            open_tap(None, "tapu")
        assert Path("/proc/thread-self/ns/net").stat().st_ino == home
    finally:
        lab.close()
