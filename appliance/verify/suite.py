"""One way to run a generated testinfra suite (the tree checks, the boot suite) and read its result:
pytest in a process of its own, the verdict from its JUnit XML report, not from its console text."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

from ..runner import run


def host_id(hosts: str, args: tuple[str, ...] = ()) -> str:
    """The id testinfra gives the host in each test's name: "local", "chroot:///path",
    "paramiko://HOST" (without user and port)."""
    if hosts == "local://":
        return "local"
    if "--connection=chroot" in args:
        return f"chroot://{hosts}"
    scheme, _, rest = hosts.partition("://")
    host = rest.rsplit("@", 1)[-1]
    return f"{scheme}://{host.rsplit(':', 1)[0] if host.count(':') == 1 else host}"


def _without_host(name: str, hid: str) -> str:
    """test_x[HOST] -> test_x; test_y[HOST-1] -> test_y[1]; test_z[a-HOST] -> test_z[a]."""
    for form, repl in ((f"[{hid}]", ""), (f"[{hid}-", "["), (f"-{hid}]", "]"), (f"-{hid}-", "-")):
        if form in name:
            return name.replace(form, repl, 1)
    return name


@dataclass(frozen=True)
class SuiteResult:
    passed: int
    failed: int  # failures and errors
    failures: list[str] = field(default_factory=list)  # test names (with their own parameters, without the host)
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.passed > 0


def run_suite(suite: Path, workdir: Path, hosts: str, *, env: dict[str, str], args: tuple[str, ...] = ()
              ) -> SuiteResult:
    workdir.mkdir(parents=True, exist_ok=True)
    ini, report = workdir / "pytest.ini", workdir / "report.xml"
    ini.write_text("[pytest]\njunit_family = xunit2\n")
    report.unlink(missing_ok=True)
    proc = run([sys.executable, "-m", "pytest", suite, "-q", "-rfE", "-p", "no:cacheprovider", "-c", ini,
                "--rootdir", workdir, "--color=no", f"--hosts={hosts}", f"--junitxml={report}", *args],
               check=False, env=env)
    output = proc.stdout + proc.stderr
    return read_report(report, output, proc.returncode, host_id(hosts, args))


def read_report(report: Path, output: str, returncode: int, hid: str = "") -> SuiteResult:
    try:
        root = ElementTree.parse(report).getroot()
    except (OSError, ElementTree.ParseError):  # pytest died before it wrote one
        return SuiteResult(0, 1, ["the suite did not run (no report)"], output)
    passed, failures = 0, []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failures.append(_without_host(case.get("name", "?"), hid))
        elif case.find("skipped") is None:
            passed += 1
    failed = len(failures)
    if failed == 0 and returncode not in (0, 1):  # an error outside any test (collection, internal)
        failed, failures = 1, [f"pytest exited with status {returncode}"]
    return SuiteResult(passed, failed, failures, output)
