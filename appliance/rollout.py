"""`appliance fleet update`: the fleet's devices updated in a careful order.

The inventory (YAML, kept beside the profiles in git) maps device names to SSH addresses:

    canary: ams            # updated first, alone (default: the first device)
    batch: 4               # then this many at a time (default 4)
    devices:
      ams: root@ams.example.net
      fra: fra.example.net:2222

The canary goes first; if it does not come back updated, nothing else is touched. Then the rest
in batches, each device's update in parallel; after a batch in which any device rolled back, was
unreachable or failed, the rollout stops and the devices not started are reported as such."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path as FsPath
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator

from .errors import ApplianceError, InputError
from .profile.loader import validate_located
from .profile.types import Name
from .profile.yamlsource import read
from .update import EXIT_ROLLED_BACK, EXIT_UNREACHABLE, Outcome, Target, UpdateReport

MAX_BATCH = 32


def _host(value: str) -> str:
    try:
        Target.parse(value)
    except InputError as e:  # its message quotes the value: say it as the inventory's
        raise ValueError(str(e).split(": ", 1)[-1]) from None
    return value


Host = Annotated[StrictStr, AfterValidator(_host)]


class Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    devices: dict[Name, Host] = Field(min_length=1, description="device name -> [USER@]HOST[:PORT]")
    canary: Name | None = Field(None, description="the device updated first, alone (default: the first)")
    batch: int = Field(4, ge=1, le=MAX_BATCH, description="devices updated at a time after the canary")

    @model_validator(mode="after")
    def _canary_known(self) -> Inventory:
        if self.canary is not None and self.canary not in self.devices:
            raise ValueError(f"canary {self.canary!r} is not one of the devices ({', '.join(self.devices)})")
        return self

    def order(self) -> list[str]:
        """The canary, then the others as the file lists them."""
        first = self.canary or next(iter(self.devices))
        return [first, *(n for n in self.devices if n != first)]


def load_inventory(path: FsPath) -> Inventory:
    """The inventory file, or ProfileError naming file, line and field."""
    return validate_located(Inventory, read(path))


class State(StrEnum):
    UPDATED = "updated"
    ROLLED_BACK = "rolled back"
    UNREACHABLE = "unreachable"
    FAILED = "failed"  # before the reboot: nothing changed on the device
    NOT_STARTED = "not started"


@dataclass
class DeviceResult:
    name: str
    state: State
    report: UpdateReport | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "state": str(self.state), "error": self.error,
                "report": self.report.to_json() if self.report else None}


def rollout(order: list[str], batch: int, update_one: Callable[[str], UpdateReport]) -> list[DeviceResult]:
    """order[0] alone (the canary), then order[1:] `batch` at a time in parallel; stop after the
    first step in which any device did not end updated."""
    steps = [order[:1]] + [order[i:i + batch] for i in range(1, len(order), batch)]
    results: list[DeviceResult] = []
    for n, names in enumerate(steps):
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(names)) as pool:
            futures = [pool.submit(_one, name, update_one) for name in names]
            done = [f.result() for f in futures]
        results += done
        if any(r.state != State.UPDATED for r in done):
            results += [DeviceResult(name, State.NOT_STARTED) for later in steps[n + 1:] for name in later]
            break
    return results


def _one(name: str, update_one: Callable[[str], UpdateReport]) -> DeviceResult:
    try:
        report = update_one(name)
    except ApplianceError as e:  # refused or failed before the reboot
        return DeviceResult(name, State.FAILED, error=str(e))
    state = {Outcome.UPDATED: State.UPDATED, Outcome.ROLLED_BACK: State.ROLLED_BACK,
             Outcome.UNREACHABLE: State.UNREACHABLE}[report.outcome]
    return DeviceResult(name, state, report)


def exit_status(results: list[DeviceResult]) -> int:
    """0 all updated; 3 a device rolled back; else 4 one was unreachable; else 1 one failed."""
    states = {r.state for r in results}
    if State.ROLLED_BACK in states:
        return EXIT_ROLLED_BACK
    if State.UNREACHABLE in states:
        return EXIT_UNREACHABLE
    return 1 if State.FAILED in states else 0
