"""Documentation that is generated must be current."""

from __future__ import annotations

from appliance.profile.readme import replace_reference
from conftest import REPO


def test_readme_reference_is_current() -> None:
    text = (REPO / "README.md").read_text()
    assert replace_reference(text) == text, "README profile reference is stale: run `make docs`"


def test_readme_names_the_two_commands_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make example" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
