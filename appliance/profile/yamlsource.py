"""YAML files to plain data plus a map from field path to (file, line, column).

ruamel.yaml's round-trip loader keeps the position of every key and value; we copy the data into
plain dicts/lists (so nothing downstream depends on ruamel types) and keep the positions beside it.
"""

from __future__ import annotations

import datetime
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path as FsPath
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import Issue, Path, ProfileError, display_file

MAX_NODES = 100_000  # a profile has a few hundred nodes (a big one 20,000 allowed IPs); this stops alias bombs
MAX_BYTES = 1_000_000
MAX_DEPTH = 32  # a profile nests 5 deep


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


def read_bounded(path: FsPath, limit: int = MAX_BYTES) -> bytes:
    """A regular file's bytes, at most `limit` of them: a FIFO, a device or /dev/zero is refused
    before anything is read (opening without O_NONBLOCK would wait for a FIFO's writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "a directory") if stat.S_ISDIR(st.st_mode) else \
                NotARegularFile(errno.EINVAL, "not a regular file")
        if st.st_size > limit:
            raise TooLarge(errno.EFBIG, f"larger than {limit} bytes")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # it grew while we read
            raise TooLarge(errno.EFBIG, f"larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


class NotARegularFile(OSError):
    pass


class TooLarge(OSError):
    pass


def read(path: FsPath) -> Located:
    shown = display_file(str(path))
    try:
        raw = read_bounded(path)
    except TooLarge:
        raise _fail(shown, f"file is larger than {MAX_BYTES} bytes: not a profile") from None
    except NotARegularFile:
        raise _fail(shown, "not a regular file (a FIFO, a device?): a profile is a YAML file") from None
    except OSError as e:
        raise _fail(shown, f"cannot read profile: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(shown, f"not UTF-8 text (byte {e.start})") from None
    return parse(text, shown)


def _syntax_error(e: MarkedYAMLError, text: str, shown: str) -> ProfileError:
    """Where and what, in ruamel's words about the grammar, never the file's own text (which may not
    be a profile at all: a secret file named by mistake)."""
    problem_mark, context_mark = e.problem_mark, e.context_mark
    problem = (e.problem or "").strip()
    if "duplicate key" in problem or type(e).__name__ == "DuplicateKeyError":
        mark = problem_mark or context_mark
        message = "duplicate key: this key is already set earlier in the same map"
    elif context_mark is not None and ("<stream end>" in problem or "end of stream" in problem):
        # an unclosed bracket or quote: where it was opened, not the line after the file's end
        mark = context_mark
        message = f"{(e.context or 'this').removeprefix('while ')} that starts here is never closed"
        message = "a " + message.removeprefix("parsing a ").removeprefix("scanning a ")
    else:
        mark = problem_mark or context_mark
        message = " ".join(str(x) for x in (e.context, e.problem) if x) or "invalid YAML"
        message = re.sub(r"'[^']*'", lambda m: m.group(0) if m.group(0).startswith("'<") else "", message)
        message = " ".join(message.split())
    line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
    return _fail(shown, f"YAML syntax error: {message}", line, col)


def parse(text: str, shown: str) -> Located:
    """YAML 1.2 as ruamel's safe loader reads it, composed into nodes (which carry their positions)
    and turned into plain data here: ~40% faster than the round-trip loader on a big profile (20,000
    allowed IPs), with duplicate keys, tags and alias loops refused where they are written."""
    yaml = YAML(typ="safe", pure=True)
    try:
        root = yaml.compose(text)
        out = Located(data=None)
        out.values[()] = Pos(shown, 1, 1)
        if root is None:
            raise _fail(shown, "the profile is empty: expected a map with name, roles, interfaces and wireguard", 1, 1)
        if not isinstance(root, MappingNode):
            raise _fail(shown, "a profile is a map of settings (name: ..., roles: ...), not a single value", 1, 1)
        out.data = _Converter(yaml.constructor, shown, out).value(root, (), frozenset())
    except MarkedYAMLError as e:
        raise _syntax_error(e, text, shown) from None
    except YAMLError as e:
        raise _fail(shown, f"YAML error ({type(e).__name__})") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # ruamel raises plain exceptions for a few malformed scalars (e.g. impossible timestamps)
        raise _fail(shown, f"YAML error: {type(e).__name__} in a value") from None
    return out


_STANDARD_TAG = "tag:yaml.org,2002:"
_MERGE = _STANDARD_TAG + "merge"
_PLAIN_TAGS = {_STANDARD_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp", "map", "seq")}


def _pos(shown: str, node: Node) -> Pos:
    return Pos(shown, node.start_mark.line + 1, node.start_mark.column + 1)


class _Converter:
    """Nodes -> plain dicts, lists and scalars, recording where each value and key is written."""

    def __init__(self, constructor: Any, shown: str, out: Located):
        self.constructor, self.shown, self.out = constructor, shown, out
        self.count = 0

    def fail(self, message: str, node: Node) -> ProfileError:
        pos = _pos(self.shown, node)
        return _fail(self.shown, message, pos.line, pos.column)

    def value(self, node: Node, path: Path, active: frozenset[int]) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _fail(self.shown, f"the profile has more than {MAX_NODES} values (alias expansion?): not a profile")
        if len(path) > MAX_DEPTH:
            raise self.fail(f"values nested more than {MAX_DEPTH} deep: not a profile", node)
        if node.tag not in _PLAIN_TAGS:
            what = "binary values are" if node.tag == _STANDARD_TAG + "binary" else "YAML tags (!name) are"
            raise self.fail(f"{what} not part of a profile: write the plain value", node)
        if isinstance(node, ScalarNode):
            return _scalar(self.constructor.construct_object(node, deep=True))
        if id(node) in active:
            raise self.fail("recursive YAML alias: a value contains itself", node)
        active = active | {id(node)}
        if isinstance(node, SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                self.out.values[(*path, i)] = _pos(self.shown, item)
                items.append(self.value(item, (*path, i), active))
            return items
        if not isinstance(node, MappingNode):
            raise self.fail(f"unexpected YAML node ({type(node).__name__})", node)
        return self.mapping(node, path, active)

    def mapping(self, node: MappingNode, path: Path, active: frozenset[int]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:  # `<<: *base`: the base's keys, under the ones written here
                for base in value_node.value if isinstance(value_node, SequenceNode) else [value_node]:
                    if not isinstance(base, MappingNode):
                        raise self.fail("a merge key (<<) takes a map or a list of maps", base)
                    for k, v in self.mapping(base, path, active | {id(node)}).items():
                        merged.setdefault(k, v)
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag != _STANDARD_TAG + "str":
                raise self.fail("keys must be text", key_node)
            key = str(key_node.value)
            if key in result:
                raise self.fail("duplicate key: this key is already set earlier in the same map", key_node)
            child = (*path, key)
            self.out.keys[child] = _pos(self.shown, key_node)
            self.out.values[child] = _pos(self.shown, value_node)
            result[key] = self.value(value_node, child, active)
        return {**merged, **result}


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
