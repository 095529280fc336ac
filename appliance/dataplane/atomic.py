"""Writing a file so that it is never seen half-written and never with a wider mode than asked:
a temporary sibling, made with the final mode before the first byte, synced, then renamed over.
Here, in the on-device package (standard library only), so that the device's state files and the
host's lock, secret store and schema are written the same way (appliance.fsutil re-exports it)."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """path gets data whole or not at all; its mode is `mode` from the first byte (0600 for secrets)."""
    # imported on first use: the userspace dataplane imports this module on the tunnel's way up, and
    # tempfile (random, shutil) costs ~7 ms there on a workstation, ten times that under emulation
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
