"""WireGuard keys and the secret store that keeps them out of git."""

from .for_profile import appliance_keys, key_issues, keys_for, needs_socks5_password
from .keys import generate_preshared_key, generate_private_key, public_key
from .store import ApplianceKeys, SecretStore, SecretStoreError, default_store_path

__all__ = [
    "ApplianceKeys",
    "SecretStore",
    "SecretStoreError",
    "appliance_keys",
    "default_store_path",
    "generate_preshared_key",
    "generate_private_key",
    "key_issues",
    "keys_for",
    "needs_socks5_password",
    "public_key",
]
