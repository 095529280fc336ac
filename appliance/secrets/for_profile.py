"""The secrets a profile needs, from the store, and the checks that need them as well as the profile."""

from __future__ import annotations

from pathlib import Path

from ..profile import Issue, LoadedProfile, Profile, ProfileError
from ..profile.model import UserspaceDataplane
from .store import ApplianceKeys, SecretStore, default_store_path


def needs_socks5_password(p: Profile) -> bool:
    """A SOCKS5 proxy others can reach (not on loopback) takes a password."""
    if not isinstance(p.dataplane, UserspaceDataplane):
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


def keys_for(loaded: LoadedProfile, secrets: Path | None = None) -> ApplianceKeys:
    """The profile's keys from its secret store (`secrets`, else the repository's: see store.py).
    Raises SecretStoreError, or ProfileError for a peer that has the appliance's own key."""
    keys = appliance_keys(SecretStore(secrets if secrets is not None else default_store_path(loaded.path)),
                          loaded.profile)
    issues = key_issues(loaded, keys)
    if issues:
        raise ProfileError(issues)
    return keys
