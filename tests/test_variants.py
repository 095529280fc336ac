"""The boot lab's variant matrix (tests/variants/) is complete: every enum value and boolean of the
profile fields that change the appliance's behaviour appears in it both ways, so a setting the
examples do not use is still booted and checked by a suite derived from it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.profile import Profile, load_profile

VARIANTS = sorted((Path(__file__).parent / "variants").glob("*.yaml"))


def _dual_stack(p: Profile) -> bool:
    return any(a.version == 6 for a in p.wireguard.addresses)


def _ipv6(p: Profile) -> str:
    v6 = p.interfaces.uplink.ipv6 if p.interfaces.uplink else "off"
    return v6 if isinstance(v6, str) else "static"


def _ipv4(p: Profile) -> str:
    v4 = p.interfaces.uplink.ipv4 if p.interfaces.uplink else "off"
    return v4 if isinstance(v4, str) else "static"


# a setting, how to read it from a profile, and every value it must take somewhere in the matrix
SETTINGS: list[tuple[str, Callable[[Profile], object], set[object]]] = [
    ("dataplane.mode", lambda p: p.dataplane.mode, {"kernel", "userspace"}),
    ("dataplane.wireguard (kernel mode)", lambda p: p.dataplane.wireguard if p.kernel_mode else None,
     {"kernel", "wireguard-go", None}),
    ("exit node", lambda p: p.is_exit_node, {True, False}),
    ("subnet router", lambda p: p.is_subnet_router, {True, False}),
    ("routing.snat (kernel mode)", lambda p: p.routing.snat if p.kernel_mode else None, {True, False, None}),
    ("NAT66 (kernel mode, dual stack)", lambda p: 6 in p.masquerade_families if p.kernel_mode and _dual_stack(p)
     else None, {True, False, None}),
    ("routing.mss_clamp", lambda p: p.routing.mss_clamp, {True, False}),
    ("uplink offload.udp_gro_forwarding", lambda p: p.interfaces.uplink.offload.udp_gro_forwarding
     if p.interfaces.uplink else None, {True, False}),
    ("firewall.shields_up", lambda p: p.firewall.shields_up, {True, False}),
    ("firewall.acl", lambda p: bool(p.firewall.acl), {True, False}),
    ("firewall.block_local_networks", lambda p: p.firewall.block_local_networks, {True, False}),
    ("dual stack", _dual_stack, {True, False}),
    ("uplink ipv4", _ipv4, {"dhcp", "static"}),
    ("uplink ipv6", _ipv6, {"ra", "static", "off"}),
    ("dns.serve", lambda p: p.dns.serve, {True, False}),
    ("dns.lan", lambda p: p.dns.lan, {True, False}),
    ("metrics on the tunnel", lambda p: "tunnel" in p.metrics.listen_on, {True, False}),
    ("metrics on the lan", lambda p: "lan" in p.metrics.listen_on, {True, False}),
]


@pytest.fixture(scope="module")
def profiles() -> list[Profile]:
    return [load_profile(v).profile for v in VARIANTS]


def test_at_least_eight_variants(profiles: list[Profile]) -> None:
    assert len(profiles) >= 8 and len({p.name for p in profiles}) == len(profiles)


def missing(profiles: list[Profile]) -> dict[str, set[object]]:
    """Each setting's values that no profile takes."""
    gaps = {name: values - {read(p) for p in profiles} for name, read, values in SETTINGS}
    return {name: gap for name, gap in gaps.items() if gap}


def test_matrix_takes_every_value(profiles: list[Profile]) -> None:
    assert missing(profiles) == {}


def test_the_check_catches_a_missing_value(profiles: list[Profile]) -> None:
    """Control: without the variants that serve no DNS, or without the userspace ones, the matrix is
    incomplete and the check names what is missing."""
    assert missing([p for p in profiles if p.dns.serve])["dns.serve"] == {False}
    assert "dataplane.mode" in missing([p for p in profiles if p.kernel_mode])
