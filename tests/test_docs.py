"""Documentation that is generated must be current."""

from __future__ import annotations

from appliance.profile.readme import replace_reference
from conftest import REPO


def test_readme_reference_is_current() -> None:
    text = (REPO / "README.md").read_text()
    assert replace_reference(text) == text, "README profile reference is stale: run `make docs`"


def test_readme_gives_exactly_the_two_commands_and_ci_runs_the_second() -> None:
    """The fresh-machine block holds exactly `make example` and `make test`; both targets set up
    first; .ci/run's one command is `make test`."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a fresh machine", 1)[1].split("##", 1)[0]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands = [ln.split("#", 1)[0].strip() for ln in block.splitlines() if ln.split("#", 1)[0].strip()]
    assert commands == ["make example", "make test"], commands
    makefile = (REPO / "Makefile").read_text()
    for target in ("example", "test"):
        line = next(ln for ln in makefile.splitlines() if ln.startswith(f"{target}:"))
        assert "setup" in line.split(":", 1)[1], line
    run = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()
           if ln.strip() and not ln.startswith(("#", "set ", "cd ", "export "))]
    assert run == ["make test"], run
