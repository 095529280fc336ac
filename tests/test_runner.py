"""The one runner (appliance.runner), the suite reader (verify.suite) and the firmware lookup
(verify.firmware): each checked with real commands and files, and with the mistake it must catch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
