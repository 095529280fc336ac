"""Whatever the input, the loader returns a Profile or raises ProfileError: never another exception."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from appliance.profile import LoadedProfile, ProfileError, json_schema, load_profile

BASE_TEXT = (Path(__file__).parent / "profile_base.yaml").read_text()
BASE_DATA = YAML(typ="safe").load(BASE_TEXT)


def _field_names() -> list[str]:
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            names.update(node.get("properties", {}))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json_schema())
    return sorted(names)


KEYS = st.sampled_from(_field_names()) | st.text(min_size=1, max_size=8)
SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=30)
    | st.sampled_from(["dhcp", "ra", "off", "kernel", "userspace", "exit-node", "10.0.0.0/8", "100.64.0.1/32",
                       "bcZjDEJDw0GrFhwIcsNVVp7ZP6lqfbJdYMtZEZC+Cz0=", "en*", "::/0", "1.2.3.4:5", "*"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)


def _dump(data: Any) -> str:
    buf = io.StringIO()
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    yaml.dump(data, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _check(workdir: Path, text: str) -> None:
    f = workdir / "p.yaml"
    f.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        result = load_profile(f)
    except ProfileError as e:
        assert e.issues
        for issue in e.issues:
            assert issue.file and issue.message and issue.line >= 0 and issue.column >= 0
        return
    assert isinstance(result, LoadedProfile)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=300))
def test_random_text(workdir: Path, text: str) -> None:
    _check(workdir, text)


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=8))
def test_random_structures(workdir: Path, data: dict[str, Any]) -> None:
    _check(workdir, _dump(data))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


PATHS = [p for p in _paths(BASE_DATA) if p]


@FUZZ
@given(st.sampled_from(PATHS), VALUES | st.just("__delete__"))
def test_mutated_valid_profile(workdir: Path, path: tuple[Any, ...], value: Any) -> None:
    import copy

    data = copy.deepcopy(BASE_DATA)
    node = data
    for part in path[:-1]:
        node = node[part]
    if value == "__delete__":
        del node[path[-1]]
    else:
        node[path[-1]] = value
    _check(workdir, _dump(data))
