"""YAML files to plain data plus a map from field path to (file, line, column).

ruamel.yaml's round-trip loader keeps the position of every key and value; we copy the data into
plain dicts/lists (so nothing downstream depends on ruamel types) and keep the positions beside it.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from .errors import Issue, Path, ProfileError, display_file

MAX_NODES = 20_000  # a profile has a few hundred nodes; this stops alias bombs
MAX_BYTES = 1_000_000


@dataclass(frozen=True)
class Pos:
    file: str
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Located:
    data: Any
    values: dict[Path, Pos] = field(default_factory=dict)  # where each value starts
    keys: dict[Path, Pos] = field(default_factory=dict)  # where each map key is written


def _fail(file: str, message: str, line: int = 0, column: int = 0) -> ProfileError:
    return ProfileError([Issue(file, line, column, "", message)])


def read(path: FsPath) -> Located:
    shown = display_file(str(path))
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _fail(shown, f"cannot read profile: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise _fail(shown, f"file is larger than {MAX_BYTES} bytes: not a profile")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(shown, f"not UTF-8 text (byte {e.start})") from None
    return parse(text, shown)


def parse(text: str, shown: str) -> Located:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(str(x) for x in (e.context, e.problem) if x) or "invalid YAML"
        if "duplicate key" in problem or type(e).__name__ == "DuplicateKeyError":
            problem = "duplicate key: " + (e.problem or "").strip().split("\n")[0]
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise _fail(shown, f"YAML syntax error: {problem}", line, col) from None
    except YAMLError as e:
        raise _fail(shown, f"YAML error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # ruamel raises plain exceptions for a few malformed scalars (e.g. impossible timestamps)
        raise _fail(shown, f"YAML error: {e}") from None
    if doc is None:
        raise _fail(shown, "the profile is empty: expected a map with name, roles, interfaces and wireguard", 1, 1)
    if not isinstance(doc, dict):
        raise _fail(shown, "a profile is a map of settings (name: ..., roles: ...), not a single value", 1, 1)
    out = Located(data=None)
    out.values[()] = Pos(shown, 1, 1)
    counter = [0]
    out.data = _plain(doc, (), shown, out, counter, set())
    return out


def _lc(node: Any, kind: str, key: Any) -> tuple[int, int] | None:
    try:
        pos = getattr(node.lc, kind)(key)
    except (AttributeError, KeyError, IndexError, TypeError):
        return None
    return (pos[0] + 1, pos[1] + 1) if pos and pos[0] is not None else None


def _plain(node: Any, path: Path, shown: str, out: Located, counter: list[int], active: set[int]) -> Any:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise _fail(shown, f"the profile has more than {MAX_NODES} values (alias expansion?): not a profile")
    if isinstance(node, dict | list):
        if id(node) in active:
            pos = out.values.get(path)
            raise _fail(shown, "recursive YAML alias: a value contains itself", *(pos.line, pos.column) if pos else ())
        active = active | {id(node)}
    if isinstance(node, dict):
        result: dict[str, Any] = {}
        for key, value in node.items():
            kpos = _lc(node, "key", key)
            vpos = _lc(node, "value", key) or kpos
            if not isinstance(key, str):
                line, col = kpos or (0, 0)
                raise _fail(shown, f"keys must be text, got {key!r}", line, col)
            child = (*path, key)
            if kpos:
                out.keys[child] = Pos(shown, *kpos)
            if vpos:
                out.values[child] = Pos(shown, *vpos)
            result[key] = _plain(value, child, shown, out, counter, active)
        return result
    if isinstance(node, list):
        items = []
        for i, value in enumerate(node):
            child = (*path, i)
            ipos = _lc(node, "item", i)
            if ipos:
                out.values[child] = Pos(shown, *ipos)
            items.append(_plain(value, child, shown, out, counter, active))
        return items
    return _scalar(node)


def _scalar(node: Any) -> Any:
    if node is None or isinstance(node, bool):
        return node
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, datetime.date | datetime.datetime):
        return node.isoformat()
    return str(node)  # tagged scalars and the like: let validation say what was expected
