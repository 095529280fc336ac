"""The secrets a profile needs, from the store, and the checks that need them as well as the profile."""

from __future__ import annotations

from ..profile import Issue, LoadedProfile, Profile
from .store import ApplianceKeys, SecretStore


def needs_socks5_password(p: Profile) -> bool:
    """A SOCKS5 proxy others can reach (not on loopback) takes a password."""
    if p.dataplane.mode != "userspace":
        return False
    ip, _ = p.dataplane.socks5_address
    return not ip.is_loopback


def appliance_keys(store: SecretStore, p: Profile) -> ApplianceKeys:
    return store.appliance_keys(p.name, [x.name for x in p.wireguard.peers if x.preshared_key],
                                socks5=needs_socks5_password(p))


def key_issues(loaded: LoadedProfile, keys: ApplianceKeys) -> list[Issue]:
    """A peer whose public key is the appliance's own could never complete a handshake."""
    own = keys.public_key
    return [loaded.issue(("wireguard", "peers", i, "public_key"),
                         f"this is the appliance's own public key (peer '{peer.name}'): give the peer's key")
            for i, peer in enumerate(loaded.profile.wireguard.peers) if peer.public_key == own]
