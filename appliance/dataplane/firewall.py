"""Whether the appliance's firewall is in the kernel. The reconciler brings nothing up until the
ruleset is there, however it was started (in the image it starts after networkd, which itself
requires the firewall; by hand or in a test it may start first): `nft -f` replaces the appliance's
table in one transaction, so once the table exists, the whole ruleset does."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

# NFPROTO_* of the table families nft knows
_FAMILIES = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}


def table_loaded(table: str) -> bool:
    """table: "FAMILY NAME" as nft writes it, e.g. "inet appliance"."""
    family, name = table.split()
    if not _nf_tables_present():
        return False
    from pyroute2.nftables.main import NFTables

    with NFTables(nfgen_family=_FAMILIES[family]) as nft:
        return any(m.get_attr("NFTA_TABLE_NAME") == name for m in nft.get_tables())


def _nf_tables_present() -> bool:
    """Asking nfnetlink before nf_tables is loaded would make the kernel load it: a modprobe per ask,
    while the firewall's unit is loading it."""
    return Path("/sys/module/nf_tables").exists() or _nf_tables_builtin()


@functools.cache
def _nf_tables_builtin() -> bool:
    """Read once: wait_for_table asks every 50 ms while it waits."""
    try:
        builtin = Path(f"/lib/modules/{os.uname().release}/modules.builtin").read_text()
    except OSError:
        return True  # cannot tell: ask
    return "/nf_tables.ko" in builtin


def wait_for_table(table: str, say: Callable[[str], None], poll: float = 0.05) -> float:
    """Block until `table` is loaded; returns the seconds waited. No time limit: without its
    firewall the appliance stays closed (systemd's start timeout restarts the service)."""
    start = time.monotonic()
    if table_loaded(table):
        return 0.0
    say(f"waiting for the firewall (table {table})")
    while not table_loaded(table):
        time.sleep(poll)
    return time.monotonic() - start
