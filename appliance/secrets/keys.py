"""WireGuard keys: X25519 private keys, their public keys, and preshared keys (all base64, 32 bytes)."""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat


def generate_private_key() -> str:
    raw = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def public_key(private_key_b64: str) -> str:
    raw = base64.b64decode(private_key_b64.strip(), validate=True)
    if len(raw) != 32:
        raise ValueError("a WireGuard private key is 32 bytes")
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(pub).decode()


def generate_preshared_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()
