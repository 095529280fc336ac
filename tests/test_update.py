"""Updates in the field, end to end under QEMU: a device on a persistent disk is updated over SSH into
its other root slot and reboots into it; a healthy root is blessed and kept, an unhealthy one rolls
back by itself. Each step is judged by the device's own state and by the generated boot suite with
real traffic through the tunnel."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from appliance.dataplane.health import HealthConfig
from appliance.errors import ApplianceError, InputError
from appliance.image import Cache, image_spec
from appliance.image.disk import DiskIds, Slot
from appliance.image.provenance import Source
from appliance.image.tools import ToolsTree
from appliance.profile import Profile, load_profile
from appliance.render import ConfigTree
from appliance.ui import step
from appliance.update import Outcome, Target, UpdateReport, update
from appliance.verify.boot import BootReport, BootTest, emulator_fault
from appliance.verify.cases import lab_peer
from conftest import PROFILES, warn_retries

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.vm]

T = TypeVar("T")
CACHE = Path(os.environ.get("APPLIANCE_TEST_CACHE") or Path.home() / ".cache" / "appliance-tests")


def unhealthy(tree: ConfigTree) -> None:
    """A root whose health check cannot pass (sshd on a port nothing listens on), in 10 s."""
    del tree.entries["etc/appliance/health.json"]
    tree.file("etc/appliance/health.json", HealthConfig(ssh_port=1, grace=10).dumps())


class UpdateScenario(BootTest):
    """v1 (the profile without its last peer) boots and its suite passes; then:
    v2 adds that peer -> v2 runs from slot B, blessed; the lab gains the peer; suite passes;
    v3 is unhealthy -> the device goes back to v2 by itself, the update says why; suite passes;
    v4: the power is cut while its root is sent -> the device comes back on v2; v4 again -> updated
    into slot A; suite passes. What each step found is kept for the test to judge.

    A step during which the VM's kernel died of TCG itself (verify.boot.emulator_fault: "Oops:
    int3", ~1 boot in 20 here) and did not do what it should is run once more, after the device
    rebooted by itself (panic=10); the faults are kept in emulator_faults."""

    steps: dict[str, Any]
    emulator_faults: list[str]

    def _again_on_fault(self, what: str, step: Callable[[], T], done: Callable[[T], bool]) -> T:
        assert self.live is not None
        vm = self.live.vm
        mark = len(vm.console_text())
        result = step()
        since = vm.console_text()[mark:]
        if done(result) or not emulator_fault(since):
            return result
        self.emulator_faults.append(f"{what}: {since[-3000:]}")
        self.wait_up_again()
        _status_when_up(Target("root@127.0.0.1", vm.ssh_port, self.workdir / "ssh_config"))
        return step()

    def _suite(self, report: BootReport, port: int, expect: dict[str, Any]) -> None:
        self.steps, self.emulator_faults = {}, []
        target = Target("root@127.0.0.1", port, self.workdir / "ssh_config")
        identity = "cat /etc/machine-id /var/lib/ssh/ssh_host_ed25519_key.pub /etc/timezone"
        self.steps["v1_identity"] = target.run(identity).stdout
        self.steps["v1_suite"] = self._again_on_fault("v1 suite", lambda: self._suite_as_booted(report, port, expect),
                                                      _passed)
        assert self.lab_profile is not None
        data = self.lab_profile.model_dump(mode="json")
        data["wireguard"]["peers"].append(dict(NEW_PEER))
        new_peer = lab_peer(data["wireguard"]["peers"][-1])
        v2 = Profile.model_validate(data)

        self.steps["v2"] = self._again_on_fault("v2", lambda: self._update(target, v2), _answered)
        expect = self.follow(v2, [new_peer])
        self.steps["v2_identity"] = target.run(identity).stdout
        self.steps["v2_mounts"] = target.run("findmnt -no FSTYPE,OPTIONS /").stdout
        self.steps["v2_suite"] = self._again_on_fault("v2 suite", lambda: self._suite_now(
            report, port, expect, "b", [_blessed(self.steps["v2"].entry), "exit-node-1-a.efi"]), _passed)
        self.steps["v2_status"] = target.status()

        self.sabotage = unhealthy
        self.steps["v3"] = self._again_on_fault("v3", lambda: self._update(target, with_timezone(v2, "Asia/Tokyo")),
                                                _answered)
        self.sabotage = None
        self.steps["v3_identity"] = target.run(identity).stdout
        self.steps["v3_entries"] = (target.status() or {}).get("entries")
        # the bad entry's name counts the tries it used: one, unless the emulator took one more
        bad = [e["file"] for e in self.steps["v3_entries"] or [] if e["state"] == "bad"]
        self.steps["v3_suite"] = self._again_on_fault("v3 suite", lambda: self._suite_now(
            report, port, expect, "b", [_blessed(self.steps["v2"].entry), *bad], counted=False), _passed)

        v4 = with_timezone(v2, "Europe/Berlin")
        self.steps["cut"] = self._again_on_fault("cut", lambda: self._update_cut(target, v4), lambda c: bool(c["of"]))
        self.wait_up_again()
        self.steps["cut_status"] = _status_when_up(target)
        self.steps["v4"] = self._again_on_fault("v4", lambda: self._update(target, v4), _answered)
        self.steps["v4_status"] = target.status()
        self.steps["v4_identity"] = target.run(identity).stdout
        # the image v4 came from, said to be a commit older than the device's: refused, nothing sent
        older = source_of_revision("HEAD~1")
        with tempfile.TemporaryDirectory() as work:
            try:
                update(target, self.workdir / "images" / f"{v4.name}.img", image_spec(v4), self._tools(), Path(work),
                       progress=lambda d, t: None, say=print, source=older, repo=REPO)
                self.steps["downgrade"] = "not refused"
            except InputError as e:
                self.steps["downgrade"] = str(e)
        self.steps["downgrade_status"] = target.status()
        self.steps["v4_suite"] = self._again_on_fault("v4 suite", lambda: self._suite_now(
            report, port, expect, "a", [_blessed(self.steps["v4"].entry), _blessed(self.steps["v2"].entry)]), _passed)

    def _suite_as_booted(self, report: BootReport, port: int, expect: dict[str, Any]) -> tuple[int, list[str]]:
        super()._suite(report, port, expect)
        return report.failed, list(report.failures)

    def _update(self, target: Target, profile: Profile, **kw: Any) -> UpdateReport:
        image = self._build(profile)
        with tempfile.TemporaryDirectory() as work:
            return update(target, image, image_spec(profile), self._tools(), Path(work), say=print, boot_timeout=900,
                          **{"progress": lambda d, t: None, **kw})

    def _tools(self) -> ToolsTree:
        """The tools tree the last image was built with, as `appliance update` takes it."""
        assert self.built is not None
        return self.built.tools(self.cache)

    def _update_cut(self, target: Target, profile: Profile) -> dict[str, Any]:
        """The whole root sent (no blocks reused: a long transfer), the power cut halfway through."""
        assert self.live is not None
        vm, cut = self.live.vm, {"at": 0, "of": 0, "error": ""}

        def progress(done: int, total: int) -> None:
            if not cut["of"] and done >= total // 2:
                cut.update({"at": done, "of": total})
                vm.power_cycle()

        try:
            self._update(target, profile, reuse=False, progress=progress)
        except ApplianceError as e:
            cut["error"] = str(e)
        return cut

    def _suite_now(self, report: BootReport, port: int, expect: dict[str, Any], slot: str, entries: list[str],
                   counted: bool = True) -> tuple[int, list[str]]:
        """The suite on the running root: its slot, the boot entries the ESP must hold, and whether
        this boot was a counted try (a new root) or of a root blessed before (after a rollback)."""
        self.wait_up_again()
        root = DiskIds.for_name(expect["name"]).slot_partition(Slot(slot))
        expect["disk"] = {**expect["disk"], "root_partuuid": root, "entries": entries, "counted": counted}
        super()._suite(report, port, expect)
        return report.failed, list(report.failures)


REPO = PROFILES.parent


def source_of_revision(rev: str) -> Source:
    """rev's commit in this repository; in a shallow clone without it, a commit it has never seen, a day
    older than HEAD (then the refusal goes by commit time)."""
    git = ["git", "-C", str(REPO), "log", "-1", "--format=%H %ct"]
    found = subprocess.run([*git, rev], capture_output=True, text=True)
    if found.returncode == 0 or rev == "HEAD":
        found.check_returncode()
        commit, time_ = found.stdout.split()
        return Source(commit, int(time_), False)
    head = source_of_revision("HEAD")
    return Source("0" * 40, head.time - 86400, False)


NEW_PEER = {"name": "tablet", "public_key": "", "allowed_ips": ["100.64.0.4/32", "fd7a:115c:a1e0::4/128"]}


def _blessed(entry: str) -> str:
    """An entry's name once systemd-bless-boot has marked it good (no tries counter)."""
    return entry.split("+")[0].removesuffix(".efi") + ".efi"


def _answered(r: UpdateReport) -> bool:
    return r.outcome != Outcome.UNREACHABLE


def _passed(result: tuple[int, list[str]]) -> bool:
    return result[0] == 0


def _status_when_up(target: Target) -> dict[str, Any] | None:
    for _ in range(30):
        if (st := target.status()) is not None:
            return st
        time.sleep(2)
    return None


def with_timezone(p: Profile, tz: str) -> Profile:
    data = p.model_dump(mode="json")
    data["system"]["timezone"] = tz
    return Profile.model_validate(data)


def test_update_rollback_and_power_cut() -> None:
    full = load_profile(PROFILES / "exit-node.yaml").profile
    v1 = full.model_copy(update={"wireguard": full.wireguard.model_copy(update={"peers": full.wireguard.peers[:1]})})
    scenario = UpdateScenario(v1, Cache(CACHE), step, source=source_of_revision("HEAD"),
                              persistent_disk=True)
    report = scenario.run()
    s = scenario.steps
    print({k: (v.to_json() if isinstance(v, UpdateReport) else v) for k, v in s.items()})
    print(f"power-cycled hung boots: {scenario.resets} (TCG; see VM.unstick_reboots)")
    again = [f.split(":")[0] for f in scenario.emulator_faults]
    print(f"steps run again after the emulator killed the kernel: {again}")
    warn_retries("update", [*report.emulator_faults, *(f.partition(": ")[2] for f in scenario.emulator_faults)],
                 scenario.resets)
    assert s["v1_suite"] == (0, []), s["v1_suite"]
    v2, v3, v4 = s["v2"], s["v3"], s["v4"]
    # v2: written into slot B, booted, blessed; the device kept its identity; the new peer's traffic passes
    assert (v2.outcome, v2.slot, v2.entry) == (Outcome.UPDATED, "b", "exit-node-2-b+3.efi"), v2.to_json()
    v1_id, v2_id = s["v1_identity"].split("\n"), s["v2_identity"].split("\n")
    assert v2_id == v1_id, (v1_id, v2_id)
    assert s["v2_mounts"].split()[0] == "erofs" and "ro" in s["v2_mounts"].split()[1].split(",")
    assert s["v2_suite"] == (0, []), s["v2_suite"]
    assert 0 < v2.sent_bytes < v2.payload_bytes < v2.root_bytes
    assert s["v2_status"]["release"]["name"] == "exit-node"
    # v3: unhealthy, so the device went back to v2 by itself; the update says so, and why
    assert (v3.outcome, v3.slot) == (Outcome.ROLLED_BACK, "a"), v3.to_json()
    assert v3.status and v3.status["booted_slot"] == "b"
    assert v3.reason and "ssh" in v3.reason["problems"], v3.reason
    assert s["v3_identity"] == s["v2_identity"]
    good, bad = s["v3_entries"]
    assert (good["file"], good["state"], bad["state"]) == ("exit-node-2-b.efi", "good", "bad"), s["v3_entries"]
    assert re.fullmatch(r"exit-node-3-a\+0-[123]\.efi", bad["file"]), s["v3_entries"]  # its tries used up
    assert s["v3_suite"] == (0, []), s["v3_suite"]
    # the power cut halfway through v4's root: the update failed, the device is on v2, nothing else boots
    cut, after = s["cut"], s["cut_status"]
    assert cut["of"] and cut["error"], cut
    assert after and after["booted_slot"] == "b", after
    assert [(e["file"], e["state"]) for e in after["entries"]] == [("exit-node-2-b.efi", "good")], after
    # and the next update goes through
    assert (v4.outcome, v4.slot) == (Outcome.UPDATED, "a"), v4.to_json()
    assert s["v4_identity"].split("\n")[:2] == v1_id[:2] and s["v4_identity"].split("\n")[2] == "Europe/Berlin"
    # an image of an older commit is refused before anything is sent; the device stays as it was
    assert "refusing to downgrade" in s["downgrade"] and "--allow-downgrade" in s["downgrade"], s["downgrade"]
    assert s["downgrade_status"]["entries"] == s["v4_status"]["entries"], s["downgrade_status"]
    assert s["v4_suite"] == (0, []), s["v4_suite"]
    assert report.ok, report.output[-5000:] + "\n--- console ---\n" + report.console[-3000:]
