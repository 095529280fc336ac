"""One way to build a device's image: a profile (or an already loaded one, as the boot lab's variant)
-> keys from the secret store -> rendered configuration -> build_image. `appliance build`, `appliance
fleet build` and `appliance test` all build through here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..profile import LoadedProfile, Profile, load_profile
from ..render import ConfigTree, render
from ..secrets import ApplianceKeys, keys_for
from .builder import BuildOptions, BuildResult, Step, build_image
from .manifest import ProfileInfo
from .provenance import source_of
from .run import BuildLog
from .spec import image_spec


def profile_info(loaded: LoadedProfile) -> ProfileInfo:
    return ProfileInfo(str(loaded.path), loaded.digest, tuple(str(f) for f in loaded.files),
                       source_of([Path(str(f)) for f in loaded.files]))


def build_profile(path: Path, options: BuildOptions, step: Step, *, secrets: Path | None = None,
                  root: Path | None = None) -> BuildResult:
    """Load, validate and build PROFILE: raises ProfileError, SecretStoreError or ImageError."""
    loaded = load_profile(path, root)
    return build_loaded(loaded.profile, keys_for(loaded, secrets), profile_info(loaded), options, step)


def build_loaded(profile: Profile, keys: ApplianceKeys, info: ProfileInfo, options: BuildOptions, step: Step,
                 adjust: Callable[[ConfigTree], None] | None = None) -> BuildResult:
    """adjust: changes to the rendered tree before it is built (the boot lab's management NIC, a
    test's sabotage)."""
    tree = render(profile, keys)
    if adjust is not None:
        adjust(tree)
    log = BuildLog(options.out_dir / f"{profile.name}.build.log")
    if log.path is not None:
        log.path.unlink(missing_ok=True)
    return dataclasses.replace(build_image(image_spec(profile), tree, info, options, step, log), profile=profile)
