"""A foreign architecture's tree needs the kernel to run its programs through qemu-user (binfmt_misc
with the F flag, so that it works in a chroot): without it the build stops at once and says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.image import image_spec
from appliance.image.debian import Archive
from appliance.image.platform import PLATFORMS
from appliance.image.rootfs import (
    NATIVE_BYTECODE,
    PY3COMPILE,
    PY_COMPILE,
    _customize_hooks,
    _essential_hooks,
    _require_emulation,
    base_key_inputs,
)
from appliance.image.run import ImageError
from appliance.image.spec import ImageSpec
from appliance.profile import load_profile
from conftest import PROFILES

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


def _spec(name: str) -> ImageSpec:
    return image_spec(load_profile(PROFILES / name).profile)


def test_an_emulated_tree_compiles_its_python_natively() -> None:
    """Debian's byte-compilers stand aside while an arm64 tree's packages are configured and are back
    before anything else in the tree runs; the tree's key says how it was built."""
    arm64, amd64 = _spec("arm64-exit-node.yaml"), _spec("exit-node.yaml")
    essential = " ".join(_essential_hooks(arm64))
    for path in (PY_COMPILE, PY3COMPILE):
        assert f"dpkg-divert --quiet --local --rename --add {path}" in essential
        assert path not in " ".join(_essential_hooks(amd64))  # control: a native tree compiles as Debian does
    restore = _customize_hooks(arm64, Path("/files"))[:3]
    assert all(f"--remove {p}" in " ".join(restore) for p in (PY_COMPILE, PY3COMPILE))
    assert restore[0] == f'rm -f "$1{PY_COMPILE}" "$1{PY3COMPILE}"'  # the stand-ins go before anything runs
    assert PY_COMPILE not in " ".join(_customize_hooks(amd64, Path("/files")))
    archive = Archive("http://mirror", "http://security")
    assert base_key_inputs(arm64, archive, "s", None, 0)["bytecode"] == NATIVE_BYTECODE
    assert "bytecode" not in base_key_inputs(amd64, archive, "s", None, 0)  # the host's trees keep their keys
