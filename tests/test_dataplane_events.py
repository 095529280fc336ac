"""Which rtnetlink link messages make the watching dataplane apply again (no root needed)."""

from __future__ import annotations

from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from appliance.dataplane.cli import link_set_changed


def _msg(event: str, index: int, name: str, flags: int = 0) -> ifinfmsg:
    m = ifinfmsg()
    m["index"], m["flags"], m["event"] = index, flags, event
    m["attrs"] = [("IFLA_IFNAME", name)]
    return m


def test_only_new_gone_or_renamed_links_count() -> None:
    known = {1: "lo", 2: "eth0"}
    # up/down, carrier, MTU: every link at boot, many times; nothing the dataplane set changes
    assert not link_set_changed([_msg("RTM_NEWLINK", 2, "eth0", flags=1), _msg("RTM_NEWLINK", 1, "lo")], known)
    assert link_set_changed([_msg("RTM_NEWLINK", 3, "wg0")], known)  # wireguard-go (re)started
    assert known[3] == "wg0" and not link_set_changed([_msg("RTM_NEWLINK", 3, "wg0")], known)
    assert link_set_changed([_msg("RTM_NEWLINK", 2, "enp0s3")], known)  # renamed by udev
    assert link_set_changed([_msg("RTM_DELLINK", 3, "wg0")], known) and 3 not in known
    assert not link_set_changed([_msg("RTM_DELLINK", 9, "gone")], known)  # never seen: nothing to redo
    assert known == {1: "lo", 2: "enp0s3"}
