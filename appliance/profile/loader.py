"""Load a profile: YAML (with `extends:` chains) -> validated Profile, or ProfileError with positions."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from . import yamlsource
from .checks import cross_checks
from .errors import Issue, Path, ProfileError, display_file, format_path
from .model import Profile
from .yamlsource import Located, Pos

M = TypeVar("M", bound=BaseModel)
EXTENDS = "extends"
MAX_EXTENDS = 16  # a fleet has a base or two; a deeper chain is a mistake (or an attack on the stack)
_SECRET_HINTS = ("key",)  # never echo what was given for these fields: it may be a pasted private key


@dataclass(frozen=True)
class LoadedProfile:
    profile: Profile
    path: FsPath
    files: tuple[FsPath, ...]  # the profile and every file it extends, child first
    located: Located | None = field(default=None, repr=False, compare=False)  # positions, for later checks

    def issue(self, path: Path, message: str) -> Issue:
        """An issue about a field found after loading (e.g. against the secret store), at its line."""
        if self.located is None:
            return Issue(display_file(str(self.path)), 0, 0, format_path(path), message)
        return _issue_at(self.located, path, message)

    @property
    def digest(self) -> str:
        return profile_digest(self.profile)


def profile_digest(profile: Profile) -> str:
    """sha256 of the validated profile in canonical JSON: equal for equal meaning, whatever the YAML layout."""
    canonical = json.dumps(profile.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def profile_root(path: FsPath) -> FsPath:
    """The tree a profile may draw files from: its git repository (the nearest directory above it with
    a .git), else its own directory. `extends:` and symlinked profiles stay inside it, so a profile
    cannot make the loader read (and echo in errors) a file from elsewhere on the machine."""
    start = FsPath(os.path.abspath(path)).parent
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return start


def load_profile(path: str | FsPath, root: FsPath | None = None) -> LoadedProfile:
    path = FsPath(path)
    root = profile_root(path) if root is None else root
    located, files = _load_chain(path, (), _real(root, path), None)
    profile = validate_located(Profile, located)
    findings = cross_checks(profile)
    if findings:
        raise ProfileError([_issue_at(located, f.path, f.message) for f in findings])
    return LoadedProfile(profile, path, files, located)


def _real(p: FsPath, shown: FsPath) -> FsPath:
    try:
        return p.resolve(strict=False)
    except (OSError, RuntimeError):  # a symlink loop: RuntimeError before Python 3.13
        raise ProfileError([Issue(display_file(str(shown)), 0, 0, "", "a symlink loop: cannot be read")]) from None


def _inside(real: FsPath, root: FsPath) -> bool:
    return real == root or root in real.parents


def _load_chain(path: FsPath, stack: tuple[FsPath, ...], root: FsPath,
                at: Issue | None) -> tuple[Located, tuple[FsPath, ...]]:
    """at: where the file was named (the `extends:` of the file before), for errors about it."""
    shown = display_file(str(path))

    def fail(message: str) -> ProfileError:
        if at is not None:
            return ProfileError([Issue(at.file, at.line, at.column, EXTENDS, message)])
        return ProfileError([Issue(shown, 0, 0, "", message)])

    real = _real(path, path)
    if real in stack:
        chain = " -> ".join(display_file(str(p)) for p in (*stack, real))
        raise fail(f"extends cycle: {chain}")
    if len(stack) >= MAX_EXTENDS:
        raise fail(f"extends chain deeper than {MAX_EXTENDS} files")
    if not _inside(real, root):
        what = "is a symlink to" if path.is_symlink() or at is None else "is"
        raise fail(f"{shown} {what} a file outside {display_file(str(root))}: profiles and their bases must "
                   "live inside the profile's git repository (or its directory, when it is in none)")
    located = yamlsource.read(path)
    _require_profile_keys(located, shown)
    base_ref = located.data.pop(EXTENDS, None)
    if base_ref is None:
        return located, (path,)
    pos = located.values[(EXTENDS,)]
    here = Issue(pos.file, pos.line, pos.column, EXTENDS, "")
    if not isinstance(base_ref, str) or not base_ref.strip() or "\0" in base_ref:
        raise ProfileError([Issue(pos.file, pos.line, pos.column, EXTENDS,
                                  "expected the relative path of a base profile, e.g. extends: base.yaml")])
    base_path = path.parent / base_ref
    try:
        is_file = base_path.is_file()
    except OSError:
        is_file = False
    if not is_file:
        raise ProfileError([Issue(pos.file, pos.line, pos.column, EXTENDS,
                                  f"base profile {display_file(str(base_path))} does not exist")])
    base, base_files = _load_chain(base_path, (*stack, real), root, here)
    return _merge(base, located), (path, *base_files)


def _require_profile_keys(located: Located, shown: str) -> None:
    """A YAML map none of whose keys is a profile setting is some other file: say so, and echo none of
    its keys or values (it may be a secret named by mistake)."""
    known = set(Profile.model_fields) | {EXTENDS}
    if not any(k in known for k in located.data):
        raise ProfileError([Issue(shown, 0, 0, "", "not a profile: none of its top-level keys is a profile "
                                  f"setting (expected some of {', '.join(sorted(known))})")])


def _merge(base: Located, child: Located) -> Located:
    """Maps merge key by key; lists and scalars in the child replace the base's."""
    merged = _merge_data(base.data, child.data)
    out = Located(merged)
    for path in _paths(merged, ()):
        for src, dst in ((child.values, out.values), (base.values, out.values),):
            if path in src:
                dst[path] = src[path]
                break
        for src in (child.keys, base.keys):
            if path in src:
                out.keys[path] = src[path]
                break
    return out


def _merge_data(base: Any, child: Any) -> Any:
    if isinstance(base, dict) and isinstance(child, dict):
        result = dict(base)
        for k, v in child.items():
            result[k] = _merge_data(base[k], v) if k in base else v
        return result
    return child


def _paths(data: Any, prefix: Path) -> list[Path]:
    found = [prefix]
    if isinstance(data, dict):
        for k, v in data.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += _paths(v, (*prefix, i))
    return found


def validate_located(model: type[M], located: Located) -> M:
    """located's data as model (a pydantic model), or ProfileError with each problem's file, line and field."""
    try:
        return model.model_validate(located.data)
    except ValidationError as e:
        raise ProfileError([_issue_from_pydantic(err, located) for err in e.errors()]) from None


def _data_path(data: Any, loc: tuple[str | int, ...]) -> tuple[Path, Any, bool]:
    """Follow pydantic's loc through the data. Loc also holds union tags and validator names that are
    not in the data; those are skipped. Returns (path, value at path, whether the whole loc resolved)."""
    path: list[str | int] = []
    node = data
    resolved = True
    for part in loc:
        if _has(node, part):
            node = node[part]
            path.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and part.isidentifier() and part not in _TAGS:
            path.append(part)  # a missing key: name it, point at its parent map
            resolved = False
            node = None
        else:
            continue
    return tuple(path), node, resolved


_TAGS = {"static", "mode", "kernel", "userspace"}


def _has(node: Any, part: str | int) -> bool:
    if isinstance(node, dict):
        return isinstance(part, str) and part in node
    return isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)


def _position(located: Located, path: Path, prefer_key: bool = False) -> Pos:
    if prefer_key and path in located.keys:
        return located.keys[path]
    for n in range(len(path), -1, -1):
        if path[:n] in located.values:
            return located.values[path[:n]]
    return located.values[()]


def _issue_at(located: Located, path: Path, message: str) -> Issue:
    pos = _position(located, path)
    return Issue(pos.file, pos.line, pos.column, format_path(path), message)


def _issue_from_pydantic(err: Any, located: Located) -> Issue:
    path, given, resolved = _data_path(located.data, tuple(err["loc"]))
    kind = err["type"]
    if kind == "missing":
        field = path[-1] if path else "?"
        message = f"required field '{field}' is missing"
        pos = _position(located, path)
    elif kind == "extra_forbidden":
        field = str(path[-1])
        message = f"unknown key '{field}'" + _did_you_mean(field, path[:-1], located.data)
        pos = _position(located, path, prefer_key=True)
    else:
        message = _rewrite(err["msg"]) + _given(path, given if resolved else err.get("input"))
        pos = _position(located, path)
    return Issue(pos.file, pos.line, pos.column, format_path(path), message)


def _rewrite(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    msg = msg.replace("Input should be", "expected").replace("input should be", "expected")
    return msg[:1].lower() + msg[1:]


def _given(path: Path, value: Any) -> str:
    if any(h in str(p) for p in path for h in _SECRET_HINTS):
        return ""
    if isinstance(value, dict):
        return " (got a map)"
    if isinstance(value, list):
        return " (got a list)"
    text = repr(value)
    return f" (got {text if len(text) <= 60 else text[:57] + '...'})"


def _did_you_mean(key: str, parent: Path, data: Any) -> str:
    allowed, elsewhere = _allowed_keys(parent, data)
    if key in elsewhere:
        return f": '{key}' belongs to mode: {elsewhere[key]}"
    if not allowed:
        return ""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    if close:
        return f": did you mean '{close[0]}'?"
    return f": expected one of {', '.join(sorted(allowed))}"


@functools.cache
def _schema() -> dict[str, Any]:
    return Profile.model_json_schema()


def _mode_variant(nodes: list[dict[str, Any]], value: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Of a discriminated union (`mode:`), the variant the data names, and the keys only the other
    variants have (key -> their mode)."""
    if not (isinstance(value, dict) and "mode" in value):
        return nodes, {}

    def mode_of(n: dict[str, Any]) -> Any:
        return n.get("properties", {}).get("mode", {}).get("const")

    same = [n for n in nodes if mode_of(n) == value["mode"]]
    if not same:
        return nodes, {}
    others = [n for n in nodes if mode_of(n) not in (None, value["mode"])]
    own = {k for n in same for k in n.get("properties", {})}
    return same, {k: mode_of(n) for n in others for k in n.get("properties", {}) if k not in own}


def _allowed_keys(parent: Path, data: Any) -> tuple[list[str], dict[str, str]]:
    """Keys the model accepts at `parent`, found by walking the JSON Schema alongside the data, and
    keys that only other variants of a `mode:` union accept (key -> that mode)."""
    schema = _schema()
    defs = schema.get("$defs", {})

    def resolve(node: dict[str, Any]) -> list[dict[str, Any]]:
        if "$ref" in node:
            return resolve(defs[node["$ref"].split("/")[-1]])
        alts = node.get("anyOf") or node.get("oneOf")
        if alts:
            return [r for a in alts for r in resolve(a)]
        return [node]

    nodes = resolve(schema)
    value = data
    for part in parent:
        value = value.get(part) if isinstance(value, dict) else (
            value[part] if isinstance(value, list) and isinstance(part, int) and part < len(value) else None)
        nxt: list[dict[str, Any]] = []
        for node in nodes:
            if isinstance(part, int) and "items" in node:
                nxt += resolve(node["items"])
            elif isinstance(part, str) and part in node.get("properties", {}):
                nxt += resolve(node["properties"][part])
        nodes = nxt
    nodes, elsewhere = _mode_variant(nodes, value)
    keys: set[str] = set()
    for node in nodes:
        keys |= set(node.get("properties", {}))
    if not parent:
        keys.add(EXTENDS)
    return sorted(keys), elsewhere
