"""A foreign architecture's tree needs the kernel to run its programs through qemu-user (binfmt_misc
with the F flag, so that it works in a chroot): without it the build stops at once and says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.image.platform import PLATFORMS
from appliance.image.rootfs import _require_emulation
from appliance.image.run import ImageError

ARM64 = PLATFORMS["arm64"]
GOOD = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: PF\noffset 0\n"


def test_registered_with_fix_binary_is_enough(tmp_path: Path) -> None:
    (tmp_path / "qemu-aarch64").write_text(GOOD)
    _require_emulation(ARM64, tmp_path)


@pytest.mark.parametrize("text", [None, GOOD.replace("enabled", "disabled"), GOOD.replace("PF", "P")],
                         ids=["missing", "disabled", "no-F-flag"])
def test_otherwise_the_build_says_what_to_install(tmp_path: Path, text: str | None) -> None:
    if text is not None:
        (tmp_path / "qemu-aarch64").write_text(text)
    with pytest.raises(ImageError, match="install qemu-user-static and binfmt-support"):
        _require_emulation(ARM64, tmp_path)
