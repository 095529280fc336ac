"""Tier 4: the example images booted in QEMU (TCG here) in a lab network, checked by the suite
generated from each profile, with real traffic through the tunnel. A few minutes each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.image import Cache
from appliance.profile import load_profile
from appliance.render import ConfigTree
from appliance.ui import step
from appliance.verify.boot import BootReport, BootTest
from conftest import PROFILES, warn_retries

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.vm]

CACHE = Path(os.environ.get("APPLIANCE_TEST_CACHE") or Path.home() / ".cache" / "appliance-tests")


def boot(name: str, sabotage=None) -> BootReport:  # type: ignore[no-untyped-def]
    report = BootTest(load_profile(PROFILES / f"{name}.yaml").profile, Cache(CACHE), step, sabotage=sabotage).run()
    print(f"\n{name}: {report.passed} passed, {report.failed} failed, {report.timings} ({report.accel}, "
          f"{len(report.emulator_faults)} boot(s) retried after an emulator fault)")
    warn_retries(name, report.emulator_faults)
    return report


def why(report: BootReport) -> str:
    """What a failing assertion shows: the checks that failed, the suite's output and the console."""
    return (f"{report.failures}\n{report.output[-5000:]}\n--- console ---\n{report.console[-3000:]}")


# arm64-exit-node: built on this amd64 machine through qemu-user, booted in qemu-system-aarch64 (AAVMF);
# fleet/sites/ams and arm64-subnet-router: generic-board images (full kernel, initramfs-tools) on an
# AHCI disk and e1000e NICs, amd64 (q35, OVMF) and arm64 (virt, AAVMF)
@pytest.mark.parametrize("name,checks", [("exit-node", 20), ("subnet-router", 20), ("userspace-exit-node", 15),
                                         ("arm64-exit-node", 20), ("fleet/sites/ams", 20),
                                         ("arm64-subnet-router", 20)])
def test_example_passes(name: str, checks: int) -> None:
    report = boot(name)
    assert report.ok, why(report)
    assert report.passed >= checks
    assert {"boot_to_ssh", "boot_to_handshake"} <= set(report.timings)


def test_rpi4_image_boots_in_raspi4b() -> None:
    """The Pi image (built through qemu-user like any arm64 one): its boot partition read without
    mounting, then its own kernel, initramfs, device tree, command line and root booted in QEMU's
    raspi4b to multi-user.target (no lab network: raspi4b has no Ethernet; verify/raspi.py)."""
    report = boot("rpi4-subnet-router")
    assert report.ok, why(report)
    assert report.passed == 3 and "multi_user" in report.timings, why(report)


VARIANTS = sorted((Path(__file__).parent / "variants").glob("*.yaml"))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.stem for v in VARIANTS])
def test_variant_passes(variant: Path) -> None:
    """A profile of the variant matrix (tests/variants/: every dataplane, role, SNAT/NAT66, shields,
    ACL, DNS, metrics and address setting both ways) passes the suite derived from it."""
    report = BootTest(load_profile(variant).profile, Cache(CACHE), step).run()
    print(f"\n{variant.stem}: {report.passed} passed, {report.failed} failed, {report.timings} ({report.accel})")
    warn_retries(variant.stem, report.emulator_faults)
    assert report.ok, why(report)
    assert {"boot_to_ssh", "boot_to_handshake"} <= set(report.timings)


def test_broken_image_is_caught_by_traffic() -> None:
    """Remove the SNAT rule from the rendered tree before the build: every file check still agrees
    with that tree, so only the traffic checks (source address at the far end) can catch it. The
    watchdog asks for more than the driver allows, which makes systemd disarm it: the check that PID
    1 holds the VM's watchdog must catch that, and a
    tmpfiles.d rule that points /var/lib/dpkg elsewhere: the check of the data partition's state; and
    a writable tmpfs on /usr/local: the check that the root is read-only."""
    def drop_snat(tree: ConfigTree) -> None:
        path = "etc/nftables.conf"
        text = tree.text(path)
        assert "masquerade" in text
        del tree.entries[path]
        tree.file(path, "\n".join(ln for ln in text.splitlines() if "masquerade" not in ln) + "\n", mode=0o755)
        # more than i6300esb's maximum (2046 s), as 30 s was more than the Pi 4's 15 s: systemd disarms
        watchdog = "etc/systemd/system.conf.d/10-appliance-watchdog.conf"
        assert "RuntimeWatchdogSec=default" in tree.text(watchdog)
        del tree.entries[watchdog]
        tree.file(watchdog, "[Manager]\nRuntimeWatchdogSec=2047s\n")
        tree.file("etc/tmpfiles.d/00-planted.conf", "L+ /var/lib/dpkg - - - - /usr/lib/planted\n")
        tree.file("etc/systemd/system/usr-local.mount", "[Mount]\nWhat=tmpfs\nWhere=/usr/local\nType=tmpfs\n")
        tree.symlink("etc/systemd/system/local-fs.target.wants/usr-local.mount", "/etc/systemd/system/usr-local.mount")

    report = boot("exit-node", sabotage=drop_snat)
    assert not report.ok
    assert {"test_hardware_watchdog_armed", "test_state_on_the_data_partition",
            "test_root_is_read_only"} <= set(report.failures), why(report)
    traffic = [f for f in report.failures if f.startswith("test_traffic")]
    for proto in ("tcp", "udp", "icmp"):  # what must have arrived from the appliance's address did not
        assert any(f"-{proto}" in f and "ipv6" not in f for f in traffic), report.failures
        assert any(f"-{proto}" in f and f.endswith("-ipv6]") for f in traffic), report.failures  # nor NAT66


def test_unhealthy_boot_is_not_blessed() -> None:
    """A boot whose health check fails (here: it expects sshd on a port nothing listens on) is not
    marked good: boot-complete.target fails, systemd-bless-boot does not run, and the entry keeps
    its boot counter (systemd-boot would choose it twice more, then another entry). Everything
    else, traffic included, still passes: only the health verdict and what follows from it fail."""
    from appliance.dataplane.health import HealthConfig

    def unhealthy(tree: ConfigTree) -> None:
        del tree.entries["etc/appliance/health.json"]
        tree.file("etc/appliance/health.json", HealthConfig(ssh_port=1, grace=10).dumps())

    report = boot("exit-node", sabotage=unhealthy)
    failed = {f.split("[")[0] for f in report.failures}
    assert failed == {"test_boot_is_healthy", "test_boot_is_blessed", "test_system_is_running",
                      "test_unit_active"}, why(report)
    assert [f for f in report.failures if f.startswith("test_unit_active")] == [
        "test_unit_active[appliance-health.service]"], report.failures


def test_a_boot_that_fails_early_reboots() -> None:
    """/var's mount planted to fail (an option ext4 rejects): local-fs.target fails and systemd goes to
    emergency mode, whose shell nobody can open on an appliance (root has no password). The image's
    emergency.service says what failed on the console and reboots (with boot counting a failed try),
    so the lab's VM, which QEMU ends on a reboot, stops by itself. Without that drop-in (the control)
    it sits in emergency mode ("Press Enter to continue") until the lab gives up."""
    from appliance.errors import LabError
    from appliance.render.renderer import EMERGENCY_DROPIN

    def var_fails(tree: ConfigTree) -> None:
        assert EMERGENCY_DROPIN in tree.entries
        tree.file("etc/systemd/system/var.mount.d/50-planted.conf", "[Mount]\nOptions=appliance_planted_option\n")

    with pytest.raises(LabError) as failed:
        boot("exit-node", sabotage=var_fails)
    said = str(failed.value)
    assert "VM stopped" in said, said
    assert "var.mount" in said and "appliance: this boot failed" in said, said
    assert "Press Enter" not in said, said

    # control: the same failure without the drop-in waits in emergency mode until the lab gives up
    # (here after 120 s, not the usual 240 s: the emergency comes ~15 s after QEMU starts)
    def var_fails_no_dropin(tree: ConfigTree) -> None:
        var_fails(tree)
        del tree.entries[EMERGENCY_DROPIN]

    control = BootTest(load_profile(PROFILES / "exit-node.yaml").profile, Cache(CACHE), step,
                       sabotage=var_fails_no_dropin, timeout=120.0)
    with pytest.raises(LabError) as waited:
        control.run()
    said = str(waited.value)
    assert "VM stopped" not in said and "Press Enter" in said, said


def test_var_marked_with_errors_is_repaired_at_boot() -> None:
    """The data partition marked with errors (tune2fs -E force_fsck: what the kernel does when it meets
    corruption) before the first boot: systemd-fsck checks and repairs it before /var is mounted, and
    the suite's check that it carries no error mark passes (and the first boot grows /var). The
    control: the same disk with systemd-fsck doing nothing keeps the mark, and that check fails."""
    from appliance.image import BuildResult
    from appliance.image.disk import layout
    from appliance.runner import NULL_LOG

    def mark_errors(image: Path, built: BuildResult) -> None:
        built.tools(Cache(CACHE)).run(["tune2fs", "-E", "force_fsck", f"{image}?offset={layout().data_offset}"],
                                      binds=[image.parent], log=NULL_LOG)

    profile = load_profile(PROFILES / "exit-node.yaml").profile
    report = BootTest(profile, Cache(CACHE), step, disk_sabotage=mark_errors).run()
    assert report.ok, why(report)

    def no_fsck(tree: ConfigTree) -> None:
        tree.file("etc/systemd/system/systemd-fsck@.service.d/50-planted.conf",
                  "[Service]\nExecStart=\nExecStart=/bin/true\n")

    # the mark stays; systemd-growfs also refuses the marked file system, so the first boot's growing
    # of /var fails with it (the system degraded, no data-grown stamp); the tunnel is unaffected
    control = BootTest(profile, Cache(CACHE), step, sabotage=no_fsck, disk_sabotage=mark_errors).run()
    assert "test_data_partition_has_no_errors" in control.failures, why(control)
    assert set(control.failures) <= {"test_data_partition_has_no_errors", "test_system_is_running",
                                     "test_state_on_the_data_partition"}, why(control)
