"""Which dead boots the lab retries: only the emulator's own fault, never the image's."""

from __future__ import annotations

from appliance.verify.boot import emulator_fault
from appliance.verify.vm import reboot_pending

INT3 = ("[    2.060252] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI\n[    2.060356] RIP: 0010:kfree+0xa0/0x350\n"
        "[    2.827950] Kernel panic - not syncing: Fatal exception in interrupt\n")


def test_a_stale_int3_under_tcg_is_the_emulators() -> None:
    assert emulator_fault("BdsDxe: loading Boot0001\n" + INT3)


def test_other_deaths_are_the_images() -> None:
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
