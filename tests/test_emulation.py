"""A foreign architecture's tree needs the kernel to run its programs through qemu-user (binfmt_misc
with the F flag, so that it works in a chroot): without it the build stops at once and says so."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from appliance.image import image_spec
from appliance.image.cache import Entry
from appliance.image.debian import Archive
from appliance.image.platform import PLATFORMS
from appliance.image.rootfs import (
    DEPMOD,
    DPKG_DEB,
    EMULATED_RECIPE,
    PY3COMPILE,
    PY_COMPILE,
    _customize_hooks,
    _essential_hooks,
    _native_dpkg_deb_hook,
    _require_emulation,
    base_key_inputs,
)
from appliance.image.run import ImageError
from appliance.image.spec import ImageSpec
from appliance.image.tools import ToolsTree
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


def test_an_emulated_tree_leaves_cpu_independent_work_to_native_tools() -> None:
    """Debian's byte-compilers and depmod stand aside while an arm64 tree's packages are configured,
    dpkg-deb for the tools tree's, and all are back before anything else in the tree runs; depmod then
    runs natively from the tools tree (with the tree's own as the fallback); the tree's key says how
    it was built."""
    arm64, amd64 = _spec("arm64-exit-node.yaml"), _spec("exit-node.yaml")
    tools = ToolsTree(Entry("tools", "k", Path("/cache/tools-k")))
    essential = " ".join(_essential_hooks(arm64)) + _native_dpkg_deb_hook(tools)
    for path in (PY_COMPILE, PY3COMPILE, DEPMOD, DPKG_DEB):
        assert f"dpkg-divert --quiet --local --rename --add {path}" in essential
        assert path not in " ".join(_essential_hooks(amd64))  # control: a native tree runs Debian's own
    hooks = _customize_hooks(arm64, Path("/files"), tools)
    restore = hooks[:7]
    for path in (PY_COMPILE, PY3COMPILE, DEPMOD, DPKG_DEB):  # the stand-ins go before anything runs
        assert f'rm -f "$1{path}"' in " ".join(restore) and f"--rename --remove {path}" in " ".join(restore)
    native = [h for h in hooks if "depmod -b /run/target" in h]
    assert len(native) == 1 and native[0].startswith("unshare --mount") and "/cache/tools-k/tree" in native[0]
    assert native[0].endswith('do chroot "$1" depmod -a "$v"; done; }')  # another kmod: the tree's own
    amd64_hooks = " ".join(_customize_hooks(amd64, Path("/files"), tools))
    assert PY_COMPILE not in amd64_hooks and "/run/target" not in amd64_hooks and 'chroot "$1" depmod -a' in amd64_hooks
    archive = Archive("http://mirror", "http://security")
    assert base_key_inputs(arm64, archive, "s", None, 0)["emulated"] == EMULATED_RECIPE
    assert "emulated" not in base_key_inputs(amd64, archive, "s", None, 0)  # the host's trees keep their keys


def test_a_kept_module_is_resolved_after_a_native_depmod() -> None:
    """modprobe finds what system.kernel_modules names through modules.dep, which the kernel's
    postinst did not write in an emulated tree: depmod runs before the modules are put aside, and
    again after the others are gone. Without kept modules, once (control)."""
    tools = ToolsTree(Entry("tools", "k", Path("/cache/tools-k")))
    plain = _spec("arm64-exit-node.yaml")
    kept = replace(plain, modules_keep=("iwlwifi",))
    for spec, count in ((plain, 1), (kept, 2)):
        hooks = _customize_hooks(spec, Path("/files"), tools)
        native = [i for i, h in enumerate(hooks) if "depmod -b /run/target" in h]
        assert len(native) == count, hooks
        if spec.modules_keep:
            keep = next(i for i, h in enumerate(hooks) if "--show-depends" in h)
            assert native[0] < keep < native[1]


def test_an_emulated_trees_programs_run_on_a_cpu_without_pointer_authentication(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-user's default CPU emulates pointer authentication at every call and return of Debian's
    arm64 programs: the commands that run an arm64 tree's programs (mmdebstrap and its hooks, the
    package list, the staged tree's sysusers, the tree checks) ask it for a Cortex-A72 (QEMU_CPU).
    A native tree's commands get nothing of the kind (control)."""
    from appliance.image import Cache, rootfs
    from appliance.image.builder import tree_expectations
    from appliance.image.run import NULL_LOG
    from appliance.render.tree import ConfigTree
    from appliance.verify import static

    arm64, amd64 = _spec("arm64-exit-node.yaml"), _spec("exit-node.yaml")
    assert arm64.emulator_env == {"QEMU_CPU": "cortex-a72"} and amd64.emulator_env == {}
    seen: list[dict[str, str]] = []
    extract_hooks: list[list[str]] = []

    def run(cmd: list[str], **kw: object) -> None:
        seen.append(dict(kw["env"]))  # type: ignore[call-overload]
        extract_hooks.append([str(a) for a in cmd if str(a).startswith("--extract-hook=")])
        raise ImageError("stop here")

    monkeypatch.setattr(rootfs, "run", run)
    monkeypatch.setattr(rootfs, "_require_emulation", lambda plat: None)
    tools = ToolsTree(Entry("tools", "k", tmp_path / "tools"))
    monkeypatch.setattr(ToolsTree, "available_packages", lambda self, names, log: set(names))
    for spec in (arm64, amd64):
        with pytest.raises(ImageError, match="stop here"):
            rootfs.build_base(Cache(tmp_path / "cache"), tools, Archive("http://m", "http://s"), spec,
                              NULL_LOG, snapshot="s", lock=None, sde=1)
    assert seen[0]["QEMU_CPU"] == "cortex-a72" and "QEMU_CPU" not in seen[1]
    # and an arm64 tree's packages are unpacked by a native dpkg-deb from the first one on
    assert extract_hooks[0] == [f"--extract-hook={_native_dpkg_deb_hook(tools)}"] and extract_hooks[1] == []
    # the tree checks run their commands in the environment the expectations carry
    monkeypatch.setattr(static, "run_suite", lambda suite, workdir, hosts, *, env, args: env)
    for spec, cpu in ((arm64, "cortex-a72"), (amd64, None)):
        env = static.verify_tree(tmp_path / "tree", tree_expectations(ConfigTree(), spec), tmp_path / spec.name)
        assert env.get("QEMU_CPU") == cpu  # type: ignore[attr-defined]
