"""A fleet: every profile under a directory, usually a git repository of profiles.

Devices are the profiles that are not bases: a file another profile names in `extends:` is a base and
is only used through it. Checks across devices: unique names, unique tunnel addresses and public
endpoints, and one public key per peer name (and one name per key)."""

from __future__ import annotations

import difflib
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ruamel.yaml import YAML

from .errors import ApplianceError, InputError
from .image import image_spec
from .profile import Issue, LoadedProfile, ProfileError, load_profile
from .profile.errors import display_file
from .profile.loader import profile_root
from .profile.yamlsource import read_bounded
from .render import ConfigTree, render
from .runner import run
from .secrets import ApplianceKeys

# Placeholder keys for rendering without the secret store: identical for every render, so a diff shows
# configuration changes only, and no real key is ever read or shown.
_PLACEHOLDER = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def profile_files(root: Path) -> list[Path]:
    """YAML files under root, outside hidden directories (.git, .github's workflows are not devices),
    except inventories (inventory.yaml, NAME.inventory.yaml: `appliance fleet update`'s)."""
    return sorted(p for p in root.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")
                  and not any(part.startswith(".") for part in p.relative_to(root).parts[:-1])
                  and not (p.stem == "inventory" or p.stem.endswith(".inventory")))


def fleet_root(directory: Path) -> Path:
    """What the fleet's profiles may draw files from: the git repository holding directory, else it."""
    found = profile_root(directory / "profile.yaml")
    return found if (found / ".git").exists() else directory


def _extends(path: Path) -> Path | None:
    try:
        data = YAML(typ="safe").load(read_bounded(path))
    except Exception:  # a broken file (or a FIFO, a device) is reported by validation, not here
        return None
    ref = data.get("extends") if isinstance(data, dict) else None
    return (path.parent / ref).resolve() if isinstance(ref, str) else None


def devices(root: Path) -> tuple[list[Path], list[Path]]:
    """(device profiles, bases) under root."""
    files = profile_files(root)
    bases = {b for f in files if (b := _extends(f)) is not None}
    return [f for f in files if f.resolve() not in bases], [f for f in files if f.resolve() in bases]


def device_profiles(directory: Path) -> list[Path]:
    """The device profiles `fleet check/build/update` work on: none is an error (a mistyped
    directory, or not a directory at all, would otherwise pass as an empty fleet)."""
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    found = devices(directory)[0]
    if not found:
        raise InputError(f"{directory}: no device profiles (*.yaml, *.yml) in it or below it")
    return found


@dataclass
class FleetCheck:
    loaded: list[LoadedProfile] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.issues


def check(root: Path) -> FleetCheck:
    result = FleetCheck()
    found = device_profiles(root)
    confine = fleet_root(root)
    for path in found:
        try:
            result.loaded.append(load_profile(path, confine))
        except ProfileError as e:
            result.issues += e.issues
    result.issues += _cross_checks(result.loaded)
    return result


def _cross_checks(loaded: list[LoadedProfile]) -> list[Issue]:
    issues: list[Issue] = []

    def clash(lp: LoadedProfile, path: str, what: str, other: LoadedProfile) -> None:
        issues.append(Issue(display_file(str(lp.path)), 0, 0, path,
                            f"{what} is also used by {other.profile.name} ({display_file(str(other.path))})"))

    names: dict[str, LoadedProfile] = {}
    addresses: dict[str, LoadedProfile] = {}
    endpoints: dict[str, LoadedProfile] = {}
    key_of: dict[str, tuple[str, LoadedProfile]] = {}  # peer name -> key
    name_of: dict[str, tuple[str, LoadedProfile]] = {}  # key -> peer name
    for lp in loaded:
        p = lp.profile
        if p.name in names:
            clash(lp, "name", f"name '{p.name}'", names[p.name])
        names.setdefault(p.name, lp)
        for i, a in enumerate(p.wireguard.addresses):
            if str(a.ip) in addresses:
                clash(lp, f"wireguard.addresses[{i}]", f"tunnel address {a.ip}", addresses[str(a.ip)])
            addresses.setdefault(str(a.ip), lp)
        if p.wireguard.endpoint:
            if p.wireguard.endpoint in endpoints:
                clash(lp, "wireguard.endpoint", f"endpoint {p.wireguard.endpoint}", endpoints[p.wireguard.endpoint])
            endpoints.setdefault(p.wireguard.endpoint, lp)
        for i, peer in enumerate(p.wireguard.peers):
            where = f"wireguard.peers[{i}]"
            if peer.name in key_of and key_of[peer.name][0] != peer.public_key:
                other = key_of[peer.name][1].profile.name
                issues.append(Issue(display_file(str(lp.path)), 0, 0, f"{where}.public_key",
                                    f"peer '{peer.name}' has another public key in {other}"))
            key_of.setdefault(peer.name, (peer.public_key, lp))
            if peer.public_key in name_of and name_of[peer.public_key][0] != peer.name:
                issues.append(Issue(display_file(str(lp.path)), 0, 0, f"{where}.name",
                                    f"this public key is peer '{name_of[peer.public_key][0]}' in "
                                    f"{name_of[peer.public_key][1].profile.name}"))
            name_of.setdefault(peer.public_key, (peer.name, lp))
    return issues


def render_public(lp: LoadedProfile) -> ConfigTree:
    """The configuration tree with placeholder keys: for diffs and review, never for images."""
    p = lp.profile
    return render(p, ApplianceKeys(_PLACEHOLDER, {x.name: _PLACEHOLDER for x in p.wireguard.peers}))


class Change(StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"
    UNCHANGED = "unchanged"
    INVALID = "invalid"  # the profile is there, and does not validate


@dataclass
class DeviceDiff:
    name: str
    status: Change
    diff: str
    image_changes: str  # "" | "configuration" | "packages and configuration"


def _texts(tree: ConfigTree) -> dict[str, str]:
    out = {}
    for e in tree:
        if e.secret:
            out[e.path] = "<redacted key>\n"
        elif e.kind == "symlink":
            out[e.path] = f"-> {e.target}\n"
        elif e.kind == "file":
            out[e.path] = e.data.decode(errors="replace")
    return out


def _checkout(repo: Path, rev: str, dest: Path) -> None:
    # --end-of-options: a revision is never read as an option (`--output=FILE` would write a file)
    archive = run(["git", "-C", repo, "archive", "--format=tar", "--end-of-options", rev], check=False, text=False)
    if archive.returncode != 0:
        raise ApplianceError(f"git cannot read revision {rev[:60]}: {archive.stderr.decode().strip()}")
    run(["tar", "-x", "-C", dest], input=archive.stdout, text=False)


def _render_all(root: Path, checkout: Path) -> tuple[dict[str, tuple[ConfigTree, LoadedProfile]], dict[str, Path]]:
    """Rendered devices by name, and the files that are invalid (by their path below root)."""
    out, invalid = {}, {}
    for path in devices(root)[0]:
        try:
            lp = load_profile(path, checkout)
        except ProfileError:
            invalid[str(path.relative_to(root))] = path  # `fleet check` says why
            continue
        out[lp.profile.name] = (render_public(lp), lp)
    return out, invalid


def diff(repo: Path, rev1: str, rev2: str, subdir: str = ".") -> list[DeviceDiff]:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        _checkout(repo, rev1, Path(a))
        _checkout(repo, rev2, Path(b))
        (old, _), (new, broken) = _render_all(Path(a) / subdir, Path(a)), _render_all(Path(b) / subdir, Path(b))
    results = []
    # a device whose profile became invalid is not "removed": its file is there, and broken
    became_invalid = {name for name, (_, lp) in old.items()
                      if name not in new and str(lp.path.relative_to(Path(a) / subdir)) in broken}
    for name in sorted(set(old) | set(new)):
        if name in became_invalid:
            results.append(DeviceDiff(name, Change.INVALID, "", "none: the profile is invalid (see `fleet check`)"))
            continue
        if name not in new:
            results.append(DeviceDiff(name, Change.REMOVED, "", ""))
            continue
        if name not in old:
            results.append(DeviceDiff(name, Change.ADDED, "", "new image"))
            continue
        (t1, p1), (t2, p2) = old[name], new[name]
        x1, x2 = _texts(t1), _texts(t2)
        lines: list[str] = []
        for path in sorted(set(x1) | set(x2)):
            lines += difflib.unified_diff(x1.get(path, "").splitlines(keepends=True),
                                          x2.get(path, "").splitlines(keepends=True),
                                          f"a/{path}", f"b/{path}")
        base_changed = image_spec(p1.profile).base_inputs() != image_spec(p2.profile).base_inputs()
        # boards of one architecture may share a root tree and still boot from other files
        board_changed = p1.profile.system.board != p2.profile.system.board
        changes = ("packages and configuration" if base_changed else "boot files and configuration"
                   if board_changed else "configuration" if lines else "")
        status = Change.CHANGED if lines or base_changed or board_changed else Change.UNCHANGED
        results.append(DeviceDiff(name, status, "".join(lines), changes))
    return results
