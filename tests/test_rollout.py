"""`appliance fleet update`'s inventory (errors with file, line and field) and its order: the canary
alone, then batches in parallel, stopping after the first step in which a device was not updated.
The devices here are stand-ins that answer as devices do (UpdateReport); the update itself runs on
a real device in tests/test_update.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import cli
from appliance.errors import ApplianceError
from appliance.profile import ProfileError
from appliance.rollout import State, exit_status, load_inventory, rollout
from appliance.update import Outcome, UpdateReport
from conftest import PROFILES

FLEET = PROFILES / "fleet"


def inventory(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    return path


def test_an_inventory_is_read_in_order_with_its_canary_first(tmp_path: Path) -> None:
    inv = load_inventory(inventory(tmp_path, "canary: fra\nbatch: 2\ndevices:\n  ams: root@ams.example.net\n"
                                             "  fra: fra.example.net:2222\n  par: '[2001:db8::1]'\n"))
    assert inv.order() == ["fra", "ams", "par"] and inv.batch == 2
    assert load_inventory(inventory(tmp_path, "devices: {b: x, a: y}\n")).order() == ["b", "a"]


@pytest.mark.parametrize(("text", "line", "field", "message"), [
    ("devices:\n  ams: root@ams\n  fra: '-oProxyCommand=x'\n", 3, "devices.fra", "expected [USER@]HOST[:PORT]"),
    ("devices:\n  ams: ams:99999\n", 2, "devices.ams", "port after ':' must be a number"),
    ("devices:\n  ams: [a, b]\n", 2, "devices.ams", "string"),
    ("devices:\n  ams: ams\ncanary: fra\n", 1, "", "canary 'fra' is not one of the devices"),
    ("devices:\n  ams: ams\nbatch: 0\n", 3, "batch", "greater than or equal to 1"),
    ("devices:\n  ams: ams\nbatchsize: 2\n", 3, "batchsize", "unknown key"),
    ("devices:\n  Bad_Name: ams\n", 2, "devices", ""),
    ("devices: {}\n", 1, "devices", "at least 1"),
])
def test_a_bad_inventory_names_file_line_and_field(tmp_path: Path, text: str, line: int, field: str,
                                                   message: str) -> None:
    with pytest.raises(ProfileError) as e:
        load_inventory(inventory(tmp_path, text))
    issue = e.value.issues[0]
    assert issue.file.endswith("inventory.yaml") and issue.line == line, issue
    assert issue.path.startswith(field) and message in issue.message, issue


class Devices:
    """Stand-in devices: each answers with its outcome after a short while, and counts how many
    updates ran at once."""

    def __init__(self, outcomes: dict[str, Outcome | Exception]):
        self.outcomes, self.running, self.most = outcomes, 0, 0
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, name: str) -> UpdateReport:
        with self.lock:
            self.calls.append(name)
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        outcome = self.outcomes.get(name, Outcome.UPDATED)
        if isinstance(outcome, Exception):
            raise outcome
        return UpdateReport(outcome, f"root@{name}")


def test_canary_then_batches_in_parallel() -> None:
    devices = Devices({})
    results = rollout(["c", "a", "b", "d", "e", "f"], 2, devices)
    assert devices.calls[0] == "c" and sorted(devices.calls) == ["a", "b", "c", "d", "e", "f"]
    assert devices.most == 2  # never more than a batch at once
    assert [r.state for r in results] == [State.UPDATED] * 6 and exit_status(results) == 0


def test_a_canary_that_rolls_back_stops_everything() -> None:
    devices = Devices({"c": Outcome.ROLLED_BACK})
    results = rollout(["c", "a", "b"], 4, devices)
    assert devices.calls == ["c"]
    assert [(r.name, r.state) for r in results] == [("c", State.ROLLED_BACK), ("a", State.NOT_STARTED),
                                                    ("b", State.NOT_STARTED)]
    assert exit_status(results) == 3


def test_a_bad_batch_finishes_and_stops_the_next() -> None:
    devices = Devices({"b": Outcome.UNREACHABLE, "a": ApplianceError("the device did not take the update: x")})
    results = rollout(["c", "a", "b", "d", "e"], 2, devices)
    assert sorted(devices.calls) == ["a", "b", "c"]
    states = {r.name: r.state for r in results}
    assert states == {"c": State.UPDATED, "a": State.FAILED, "b": State.UNREACHABLE, "d": State.NOT_STARTED,
                      "e": State.NOT_STARTED}
    assert next(r for r in results if r.name == "a").error.endswith(": x")
    assert exit_status(results) == 4


def test_fleet_update_refuses_an_inventory_device_without_a_profile(tmp_path: Path) -> None:
    inv = inventory(tmp_path, "devices:\n  nowhere: 127.0.0.1:22\n")
    result = CliRunner().invoke(cli, ["fleet", "update", str(FLEET), "--inventory", str(inv)])
    assert result.exit_code == 2 and "no profile under" in result.output and "nowhere" in result.output, result.output
    bad = inventory(tmp_path, "devices:\n  ams: root@ams\nbatch: many\n")
    result = CliRunner().invoke(cli, ["fleet", "update", str(FLEET), "--inventory", str(bad)])
    assert result.exit_code == 2 and "inventory.yaml:3" in result.output and "batch" in result.output, result.output


def test_the_bundled_inventory_names_the_bundled_fleet() -> None:
    from appliance import fleet

    inv = load_inventory(FLEET / "inventory.yaml")
    checked = fleet.check(FLEET)  # the inventory beside the profiles is not taken for one
    assert checked.ok and sorted(inv.devices) == sorted(lp.profile.name for lp in checked.loaded)
    assert inv.order()[0] == inv.canary
