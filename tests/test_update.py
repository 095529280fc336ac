"""Updates in the field, end to end under QEMU: a device on a persistent disk is updated over SSH into
its other root slot and reboots into it; a healthy root is blessed and kept, an unhealthy one rolls
back by itself. Each step is judged by the device's own state and by the generated boot suite with
real traffic through the tunnel."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

from appliance.dataplane.health import HealthConfig
from appliance.image import Cache
from appliance.image.debian import Archive
from appliance.image.disk import DiskIds, Slot
from appliance.image.run import NULL_LOG
from appliance.image.tools import build_tools
from appliance.profile import Profile, load_profile
from appliance.render import ConfigTree
from appliance.ui import step
from appliance.update import Outcome, Target, UpdateReport, update
from appliance.verify.boot import BootReport, BootTest
from conftest import PROFILES

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.vm]

CACHE = Path(os.environ.get("APPLIANCE_TEST_CACHE") or Path.home() / ".cache" / "appliance-tests")


def unhealthy(tree: ConfigTree) -> None:
    """A root whose health check cannot pass (sshd on a port nothing listens on), in 10 s."""
    del tree.entries["etc/appliance/health.json"]
    tree.file("etc/appliance/health.json", HealthConfig(ssh_port=1, grace=10).dumps())


class UpdateScenario(BootTest):
    """v1 boots (the lab's suite passes), then: update to v2 (a configuration change) -> v2 runs from
    slot B, blessed, suite passes; update to v3, unhealthy -> the device goes back to v2 by itself,
    the update says why, suite passes. What each step found is kept for the test to judge."""

    steps: dict[str, Any]

    def _suite(self, report: BootReport, port: int, expect: dict[str, Any]) -> None:
        self.steps = {}
        target = Target("root@127.0.0.1", port, self.workdir / "ssh_config")
        identity = "cat /etc/machine-id /var/lib/ssh/ssh_host_ed25519_key.pub /etc/timezone"
        self.steps["v1_identity"] = target.run(identity).stdout
        assert self.lab_profile is not None
        v2 = with_timezone(self.lab_profile, "Europe/Berlin")
        self.steps["v2"] = self._update(target, v2)
        self.steps["v2_identity"] = target.run(identity).stdout
        self.steps["v2_mounts"] = target.run("findmnt -no FSTYPE,OPTIONS /").stdout
        self._suite_now(report, port, expect, "b", blessed=["n-2-b.efi", "n-1-a.efi"])
        self.steps["v2_suite"] = (report.failed, report.failures)
        self.sabotage = unhealthy
        self.steps["v3"] = self._update(target, with_timezone(self.lab_profile, "Asia/Tokyo"))
        self.steps["v3_identity"] = target.run(identity).stdout
        self._suite_now(report, port, expect, "b", blessed=["n-2-b.efi"])
        self.steps["v3_entries"] = (target.status() or {}).get("entries")

    def _update(self, target: Target, profile: Profile) -> UpdateReport:
        image = self._build(profile)
        tools = build_tools(self.cache, Archive.from_env(), NULL_LOG)
        with tempfile.TemporaryDirectory() as work:
            return update(target, image, profile.name, True, tools, Path(work), progress=lambda d, t: None,
                          say=print, boot_timeout=900)

    def _suite_now(self, report: BootReport, port: int, expect: dict[str, Any], slot: str, blessed: list[str]) -> None:
        self.wait_up_again()
        name = expect["name"]
        expect["disk"] = {**expect["disk"], "root_partuuid": DiskIds.for_name(name).slot_partition(Slot(slot)),
                          "entries": [e.replace("n-", f"{name}-", 1) for e in blessed]}
        super()._suite(report, port, expect)


def with_timezone(p: Profile, tz: str) -> Profile:
    data = p.model_dump(mode="json")
    data["system"]["timezone"] = tz
    return Profile.model_validate(data)


@pytest.mark.skip(reason="QEMU 7.2 under multi-threaded TCG wedges in the guest's reset: after 'reboot: "
                         "Restarting system' one vCPU spins and neither the watchdog nor the monitor's system_reset "
                         "gets through (seen in 2 of 3 runs, once with la57=off). The update v1 -> v2 passed by hand "
                         "in a run that got through its reboot. Next: restart QEMU on the same disk (a power cycle, "
                         "which the power-cut case needs too) with the lab's TAPs attached again.")
def test_update_then_rollback() -> None:
    scenario = UpdateScenario(load_profile(PROFILES / "exit-node.yaml").profile, Cache(CACHE), step,
                              persistent_disk=True)
    report = scenario.run()
    s = scenario.steps
    print({k: (v.to_json() if isinstance(v, UpdateReport) else v) for k, v in s.items()})
    print(f"reset pressed on a hung reboot at {scenario.resets} s (TCG; see VM.unstick_reboots)")
    v2, v3 = s["v2"], s["v3"]
    # v2: written into slot B, booted, blessed; the device kept its identity and runs v2's configuration
    assert (v2.outcome, v2.slot, v2.entry) == (Outcome.UPDATED, "b", "exit-node-2-b+3.efi"), v2.to_json()
    v1_id, v2_id = s["v1_identity"].split("\n"), s["v2_identity"].split("\n")
    assert v2_id[:2] == v1_id[:2] and (v1_id[2], v2_id[2]) == ("UTC", "Europe/Berlin"), (v1_id, v2_id)
    assert s["v2_mounts"].split()[0] == "erofs" and "ro" in s["v2_mounts"].split()[1].split(",")
    assert s["v2_suite"] == (0, []), s["v2_suite"]
    assert 0 < v2.sent_bytes < v2.payload_bytes
    # v3: unhealthy, so the device went back to v2 by itself; the update says so, and why
    assert (v3.outcome, v3.slot) == (Outcome.ROLLED_BACK, "a"), v3.to_json()
    assert v3.status and v3.status["booted_slot"] == "b"
    assert v3.reason and "ssh" in v3.reason["problems"], v3.reason
    assert s["v3_identity"] == s["v2_identity"]
    assert [(e["file"], e["state"]) for e in s["v3_entries"]] == [("exit-node-2-b.efi", "good"),
                                                                  ("exit-node-3-a+0-1.efi", "bad")], s["v3_entries"]
    assert report.ok, report.output[-5000:] + "\n--- console ---\n" + report.console[-3000:]
