"""Which dead boots the lab retries: only the emulator's own fault, never the image's."""

from __future__ import annotations

from appliance.verify.boot import emulator_fault
from appliance.verify.vm import reboot_pending, silent_since_loader

INT3 = ("[    2.060252] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI\n[    2.060356] RIP: 0010:kfree+0xa0/0x350\n"
        "[    2.827950] Kernel panic - not syncing: Fatal exception in interrupt\n")


def test_a_stale_int3_under_tcg_is_the_emulators() -> None:
    assert emulator_fault("BdsDxe: loading Boot0001\n" + INT3) == "Oops: int3: 0000 [#2] PREEMPT SMP NOPTI"


# from the arm64 generic boot whose /var then failed to mount (CI, a host busy enough to stall a vCPU 21 s)
STALLS = ("[   34.568507] rcu: INFO: rcu_sched self-detected stall on CPU\n"
          "[   35.895540] rcu: INFO: rcu_sched detected expedited stalls on CPUs/tasks: { 1-.... } 5443 jiffies\n")


def test_a_cpu_the_host_starved_is_the_emulators() -> None:
    for line in STALLS.splitlines(keepends=True):
        assert emulator_fault(BOOT + line + "[FAILED] Failed to mount var.mount - /var.\n")
    assert emulator_fault("[ 12.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\r\n") == (
        "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:")  # what a retry is reported with


def test_other_deaths_are_the_images() -> None:
    assert not emulator_fault(BOOT + "[FAILED] Failed to mount var.mount - /var.\n")
    assert not emulator_fault("rcu: INFO: rcu_sched tasks kept waiting\n")
    assert not emulator_fault(INT3.replace("Oops: int3", "Oops: general protection fault"))
    assert not emulator_fault("Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)")
    assert not emulator_fault("Debian GNU/Linux 13 exit-node ttyS0\n\nexit-node login: ")


BOOT = 'BdsDxe: loading Boot0001 "UEFI Misc Device"\nexit-node login: '
RESTART = "[  104.501520] reboot: Restarting system\n"


def test_a_reboot_is_pending_until_the_firmware_starts_again() -> None:
    assert not reboot_pending(BOOT)
    assert reboot_pending(BOOT + RESTART)
    assert not reboot_pending(BOOT + RESTART + BOOT)
    # a power cycle starts the firmware with no restart before it: the next restart still counts
    assert reboot_pending(BOOT + RESTART + BOOT + BOOT + RESTART)
    assert not reboot_pending(BOOT + BOOT + RESTART + BOOT)


def _failed_boot(tmp_path, console: str, accel: str = "tcg"):  # type: ignore[no-untyped-def]
    from appliance.image import Cache
    from appliance.profile import load_profile
    from appliance.ui import step
    from appliance.verify.boot import BootReport, BootTest
    from conftest import PROFILES

    test = BootTest(load_profile(PROFILES / "exit-node.yaml").profile, Cache(tmp_path / "cache"), step,
                    workdir=tmp_path / "work")
    (test.workdir / "vm").mkdir(parents=True)
    (test.workdir / "vm" / "console.log").write_text(console)
    report = BootReport("exit-node", passed=20, failed=24, failures=["test_traffic[x]"], output="...",
                        timings={"suite": 140.0}, accel=accel)
    return test, report


def test_a_suite_failed_by_the_emulators_fault_runs_once_more(tmp_path) -> None:  # type: ignore[no-untyped-def]
    test, report = _failed_boot(tmp_path, BOOT + INT3)
    assert test._retry(1, report)
    assert (report.passed, report.failed, report.failures, report.timings) == (0, 0, [], {})
    assert len(report.emulator_faults) == 1 and (test.workdir / "vm-emulator-fault" / "console.log").exists()


def test_a_suite_failed_otherwise_is_reported_as_it_is(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for console, attempt, accel in ((BOOT, 1, "tcg"), (BOOT + INT3, 2, "tcg"), (BOOT + INT3, 1, "kvm")):
        test, report = _failed_boot(tmp_path / f"{attempt}{accel}{len(console)}", console, accel)
        assert not test._retry(attempt, report)
        assert report.failed == 24 and report.failures == ["test_traffic[x]"] and not report.emulator_faults


def test_a_loader_that_the_kernel_never_followed_is_silent() -> None:
    started = BOOT.replace("loading", "starting").split("\n")[0] + "\r\n"
    assert silent_since_loader(BOOT + RESTART + started)
    assert silent_since_loader(BOOT + RESTART + started + "\r\n  ")
    # the kernel or systemd said something, or the firmware has not got that far
    assert not silent_since_loader(BOOT + RESTART + started + "\x1b[!p\x1b]104\x07")
    assert not silent_since_loader(started + "\r\nDebian GNU/Linux 13 exit-node ttyS0\r\n")
    assert not silent_since_loader(BOOT + RESTART)
    assert not silent_since_loader("")


def test_retries_show_in_the_log_as_warnings() -> None:
    import warnings

    import pytest

    from conftest import EmulatorRetry, warn_retries

    with pytest.warns(EmulatorRetry, match=r"exit-node: a boot ran again: Oops: int3"):
        warn_retries("exit-node", [BOOT + INT3])
    with pytest.warns(EmulatorRetry, match=r"power-cycled .*: 12.5 s: silent after the boot loader"):
        warn_retries("update", [], ["12.5 s: silent after the boot loader"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_retries("exit-node", [], [])  # nothing retried: nothing said
