"""age encryption of the secret store (pyrage; the files interoperate with the `age` tool).

`appliance secrets encrypt` writes KEYFILE.age beside each key file for the given recipients; those
files can be committed. Reading a key, the store decrypts KEYFILE.age in memory when KEYFILE itself is
absent, with the identity file given by --age-identity or $APPLIANCE_AGE_IDENTITY: plaintext keys
never have to exist in the repository or on the build machine's disk."""

from __future__ import annotations

import os
from pathlib import Path

import pyrage

from ..errors import ApplianceError
from ..fsutil import atomic_write

IDENTITY_ENV = "APPLIANCE_AGE_IDENTITY"


class AgeError(ApplianceError):
    pass


def recipients(texts: list[str]) -> list[pyrage.x25519.Recipient]:
    out = []
    for t in texts:
        try:
            out.append(pyrage.x25519.Recipient.from_str(t.strip()))
        except Exception:
            raise AgeError(f"not an age recipient (age1...): {t[:20]}...") from None
    return out


def identities(path: Path | None) -> list[pyrage.x25519.Identity]:
    path = path or (Path(os.environ[IDENTITY_ENV]) if os.environ.get(IDENTITY_ENV) else None)
    if path is None:
        raise AgeError(f"encrypted keys need an age identity: --age-identity FILE or ${IDENTITY_ENV}")
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip().startswith("AGE-SECRET-KEY-")]
        return [pyrage.x25519.Identity.from_str(ln) for ln in lines]
    except Exception as e:  # OSError, or pyrage's own parse errors
        raise AgeError(f"cannot use age identity {path}: {e}") from None


def encrypt_file(path: Path, to: list[pyrage.x25519.Recipient]) -> Path:
    target = path.with_name(path.name + ".age")
    atomic_write(target, pyrage.encrypt(path.read_bytes(), to), 0o644)  # ciphertext: safe to commit and share
    return target


def decrypt_file(path: Path, identity: Path | None) -> str:
    try:
        plain: bytes = pyrage.decrypt(path.read_bytes(), identities(identity))
        return plain.decode().strip()
    except pyrage.DecryptError:
        raise AgeError(f"{path}: the age identity does not decrypt it") from None
