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
from ruamel.yaml.comments import TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError

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
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as e:
        raise _syntax_error(e, text, shown) from None
    except YAMLError as e:
        raise _fail(shown, f"YAML error ({type(e).__name__})") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # ruamel raises plain exceptions for a few malformed scalars (e.g. impossible timestamps)
        raise _fail(shown, f"YAML error: {type(e).__name__} in a value") from None
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


_STANDARD_TAG = "tag:yaml.org,2002:"


def _tag(node: Any) -> str | None:
    tag = getattr(node, "tag", None)
    value = getattr(tag, "value", tag)
    return value if isinstance(value, str) else None


def _plain(node: Any, path: Path, shown: str, out: Located, counter: list[int], active: set[int]) -> Any:
    counter[0] += 1
    tag = _tag(node)
    if tag is not None and not (tag.startswith(_STANDARD_TAG) and isinstance(node, TaggedScalar)
                                and tag == _STANDARD_TAG + "str"):
        pos = out.values.get(path)
        raise _fail(shown, "YAML tags (!name) are not part of a profile: write the plain value",
                    *((pos.line, pos.column) if pos else ()))
    if isinstance(node, bytes):  # !!binary
        pos = out.values.get(path)
        raise _fail(shown, "binary values are not part of a profile", *((pos.line, pos.column) if pos else ()))
    if len(path) > MAX_DEPTH:
        pos = out.values.get(path)
        raise _fail(shown, f"values nested more than {MAX_DEPTH} deep: not a profile",
                    *((pos.line, pos.column) if pos else ()))
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
                raise _fail(shown, f"keys must be text, not {type(key).__name__}", line, col)
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
    if isinstance(node, TaggedScalar):  # !!str: the text as written
        return str(node.value)
    if isinstance(node, str):
        return str(node)
    if isinstance(node, datetime.date | datetime.datetime):
        return node.isoformat()
    return str(node)  # tagged scalars and the like: let validation say what was expected
