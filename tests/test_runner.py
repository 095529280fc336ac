"""The one runner (appliance.runner), the suite reader (verify.suite) and the firmware lookup
(verify.firmware): each checked with real commands and files, and with the mistake it must catch."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance import runner
from appliance.runner import BuildLog, CommandFailed, environment, run
from appliance.verify.firmware import FirmwareError, uefi_firmware
from appliance.verify.suite import run_suite


def test_environment_is_an_allow_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setenv("LD_PRELOAD", "/tmp/evil.so")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = environment({"SOURCE_DATE_EPOCH": "1"})
    assert env["PATH"] == "/usr/bin:/bin" and env["SOURCE_DATE_EPOCH"] == "1"
    assert "PYTHONPATH" not in env and "LD_PRELOAD" not in env
    seen = run([sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
               env={"X_ASKED_FOR": "yes"}).stdout
    child = json.loads(seen)
    assert child.get("X_ASKED_FOR") == "yes" and "LD_PRELOAD" not in child and "PYTHONPATH" not in child


def test_a_failure_names_the_command_its_status_and_the_tail(tmp_path: Path) -> None:
    log = BuildLog(tmp_path / "build.log")
    script = "import sys; [print(f'line {i}', file=sys.stderr) for i in range(40)]; sys.exit(3)"
    with pytest.raises(CommandFailed) as e:
        run([sys.executable, "-c", script], log=log, what="the lister")
    text = str(e.value)
    assert text.startswith("the lister failed with exit status 3") and str(log.path) in text
    assert "line 39" in text and "line 0\n" not in text  # the tail, not all of it
    assert e.value.status == 3 and "line 0" in e.value.output
    assert "$ " in (tmp_path / "build.log").read_text() and "[exit 3" in (tmp_path / "build.log").read_text()
    # control: the same command without check is no error
    assert run([sys.executable, "-c", script], check=False).returncode == 3


def test_a_signal_and_a_missing_program_are_said_so() -> None:
    with pytest.raises(CommandFailed, match="killed by SIGKILL"):
        run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(CommandFailed, match="no-such-program-xyz is not installed"):
        run(["no-such-program-xyz"])


def test_suite_verdict_comes_from_the_junit_report(tmp_path: Path) -> None:
    """A real pytest run of a small testinfra-style suite: passes, failures (named without the host)
    and a suite that cannot even be collected."""
    suite = tmp_path / "suite.py"
    suite.write_text("import pytest\n"
                     "def test_ok(host):\n    assert host.file('/').is_directory\n"
                     "@pytest.mark.parametrize('n', [1, 2])\n"
                     "def test_even(host, n):\n    assert n % 2 == 0\n")
    result = run_suite(suite, tmp_path / "w", "local://", env={})
    assert (result.passed, result.failed) == (2, 1) and not result.ok
    assert result.failures == ["test_even[1]"], result.failures
    suite.write_text("import no_such_module_xyz\n")
    broken = run_suite(suite, tmp_path / "w2", "local://", env={})
    assert broken.failed >= 1 and not broken.ok


def _descriptor(d: Path, name: str, code: Path, features: list[str], arch: str = "x86_64") -> None:
    d.mkdir(exist_ok=True)
    (d / name).write_text(json.dumps({
        "interface-types": ["uefi"], "features": features,
        "mapping": {"device": "flash", "executable": {"filename": str(code)},
                    "nvram-template": {"filename": str(code.with_name(code.name.replace("CODE", "VARS")))}},
        "targets": [{"architecture": arch, "machines": ["pc-q35-*"]}]}))


def test_firmware_comes_from_the_descriptors(tmp_path: Path) -> None:
    fw = tmp_path / "fw"
    fw.mkdir()
    for name in ("SECURE_CODE.fd", "SECURE_VARS.fd", "PLAIN_CODE.fd", "PLAIN_VARS.fd"):
        (fw / name).write_bytes(b"\0")
    share, etc = tmp_path / "share", tmp_path / "etc"
    # the first by name needs SMM (the lab runs without): skipped for the plain one
    _descriptor(share, "10-secure.json", fw / "SECURE_CODE.fd", ["requires-smm", "secure-boot"])
    _descriptor(share, "20-plain.json", fw / "PLAIN_CODE.fd", ["acpi-s3"])
    _descriptor(share, "05-arm.json", fw / "PLAIN_CODE.fd", [], arch="aarch64")
    found = uefi_firmware(dirs=(share, etc))
    assert found.code == fw / "PLAIN_CODE.fd" and found.vars_template == fw / "PLAIN_VARS.fd"
    # /etc overrides a file of the same name: here with one that needs SMM, so nothing is left
    _descriptor(etc, "20-plain.json", fw / "SECURE_CODE.fd", ["requires-smm"])
    with pytest.raises(FirmwareError, match="no UEFI firmware"):
        uefi_firmware(dirs=(share, etc))


@pytest.fixture
def interrupt_in() -> Iterator[Callable[[float], object]]:
    """Raise KeyboardInterrupt in this (the main) thread after some seconds, as the suite's SIGTERM
    handler and Ctrl-C do."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def group_gone(pid_file: Path, within: float = 5.0) -> bool:
    """No running process is left in the group within a few seconds (SIGKILL takes effect
    asynchronously; a killed process may then wait as a zombie for its parent)."""
    group = pid_file.read_text().strip()

    def running() -> bool:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[2] == group and fields[0] != "Z":
                return True
        return False

    deadline = time.monotonic() + within
    while running():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_an_interrupted_command_cleans_up_and_takes_what_it_started_with_it(
        tmp_path: Path, interrupt_in: Callable[[float], object]) -> None:
    """Interrupted, run() gives the command SIGINT (a terminal's Ctrl-C reaches the whole process
    group; the command runs in a session of its own) and waits for its cleanup: mmdebstrap unmounts
    the tree's /proc and /sys then. What it started in the background (which ignores SIGINT) is
    killed with it."""
    script = (f'echo $$ > {tmp_path}/pid; trap "echo cleaned > {tmp_path}/cleaned; exit 130" INT; '
              "sleep 300 & wait")
    t0 = time.monotonic()
    interrupt_in(1.0)
    with pytest.raises(KeyboardInterrupt):
        run(["sh", "-c", script])
    assert (tmp_path / "cleaned").read_text() == "cleaned\n"
    assert time.monotonic() - t0 < 30 and group_gone(tmp_path / "pid")


def test_a_command_that_ignores_the_interrupt_is_killed_after_the_grace(
        tmp_path: Path, interrupt_in: Callable[[float], object], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "STOP_GRACE", 1.0)
    t0 = time.monotonic()
    interrupt_in(1.0)
    with pytest.raises(KeyboardInterrupt):
        run(["sh", "-c", f'trap "" INT; echo $$ > {tmp_path}/pid; sleep 300'])
    assert time.monotonic() - t0 < 30 and group_gone(tmp_path / "pid")
    # and a timeout stops it the same way, as a failure of the command
    t0 = time.monotonic()
    with pytest.raises(CommandFailed, match="did not finish within 1 s"):
        run(["sh", "-c", f'trap "" INT; echo $$ > {tmp_path}/pid2; sleep 300'], timeout=1)
    assert time.monotonic() - t0 < 30 and group_gone(tmp_path / "pid2")
