"""One way to run a command: every tool the host side drives (mmdebstrap, the tools tree, QEMU, ip,
nft, git, bmaptool, ssh, pytest suites) goes through run() or spawn().

- The environment is an allow-list (PATH, locale, proxies, HOME, TMPDIR) plus what the caller names:
  a variable of the user's shell does not change what a build does.
- The command and its output go to a log when one is given (a build's NAME.build.log).
- A failure is one error, CommandFailed, that names the command, its exit status or signal, and the
  last lines of its output; a missing program says so.

The on-device dataplane (appliance.dataplane) runs apart from this package and starts its few
programs itself."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import ApplianceError

ENV_ALLOWED = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "TERM", "http_proxy", "https_proxy",
               "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
TAIL_LINES = 15

Command = Sequence[str | os.PathLike[str]]


class CommandFailed(ApplianceError):
    """A command exited non-zero (or was killed by a signal)."""

    def __init__(self, message: str, *, status: int | None = None, output: str = ""):
        super().__init__(message)
        self.status = status
        self.output = output


class BuildLog:
    """Appends every command and its output to one file; the build prints its path on failure."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, text: str) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8", errors="replace") as f:
                f.write(text)


NULL_LOG = BuildLog(None)


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allowed part of this process's environment, and extra."""
    return {**{k: os.environ[k] for k in ENV_ALLOWED if k in os.environ}, **(extra or {})}


def describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"failed with exit status {status}"


def run(cmd: Command, *, log: BuildLog = NULL_LOG, env: Mapping[str, str] | None = None,
        input: str | bytes | None = None, cwd: Path | None = None, what: str | None = None, check: bool = True,
        stdout: IO[bytes] | None = None, timeout: float | None = None, text: bool = True,
        error: type[CommandFailed] = CommandFailed) -> subprocess.CompletedProcess[Any]:
    """Run cmd to its end. stdout: a file its output goes to (binary), instead of being captured.
    text=False: output (and input) as bytes. A failure raises `error` (with check)."""
    args = [str(c) for c in cmd]
    name = what or args[0]
    t0 = time.monotonic()
    log.write(f"\n$ {shlex.join(args)}" + (" > FILE" if stdout is not None else "") + "\n")
    try:
        with subprocess.Popen(args, env=environment(env), cwd=cwd, text=text, errors="replace" if text else None,
                              stdin=subprocess.PIPE if input is not None else None,
                              stdout=stdout if stdout is not None else subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True) as popen:
            try:
                raw_out, raw_err = popen.communicate(input, timeout=timeout)
            except BaseException:  # a timeout, or this process interrupted (Ctrl-C, SIGTERM in the suite)
                stop(popen)
                raise
        proc = subprocess.CompletedProcess(args, popen.returncode, raw_out, raw_err)
    except FileNotFoundError:
        raise error(f"{args[0]} is not installed (run `make setup`)") from None
    except subprocess.TimeoutExpired:
        raise error(f"{name} did not finish within {timeout:.0f} s") from None
    out = "" if stdout is not None else _text(proc.stdout)
    err = _text(proc.stderr)
    if stdout is not None:
        proc.stdout = "" if text else b""
    log.write(out + err + f"[exit {proc.returncode} after {time.monotonic() - t0:.1f} s]\n")
    if check and proc.returncode != 0:
        tail = "\n".join((err or out).strip().splitlines()[-TAIL_LINES:])
        where = f" (full log: {log.path})" if log.path else ""
        raise error(f"{name} {describe_status(proc.returncode)}{where}:\n{tail}", status=proc.returncode,
                    output=out + err)
    return proc


# How long a stopped command may take to clean up after SIGINT before it is killed.
STOP_GRACE = 60.0


def stop(proc: subprocess.Popen[Any]) -> None:
    """End a command run in its own session, and what it started: SIGINT to its process group, as a
    terminal's Ctrl-C, so that it can clean up (mmdebstrap unmounts what it mounted in the tree);
    SIGKILL to the group after STOP_GRACE seconds, and to whatever of the group outlives its leader."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(STOP_GRACE)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def spawn(cmd: Command, *, env: Mapping[str, str] | None = None, output: IO[Any] | int | None = None,
          new_session: bool = False, cwd: Path | None = None, stdin: IO[Any] | int | None = None,
          errors: IO[Any] | int | None = subprocess.STDOUT, pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start cmd and return at once (a lab's server, QEMU, a stream into ssh): its output to `output`
    (a file, subprocess.PIPE, or None to inherit), its errors with it unless `errors` says where;
    stdin: subprocess.PIPE to feed it; pass_fds: open files it inherits. The caller ends it."""
    args = [str(c) for c in cmd]
    try:
        return subprocess.Popen(args, env=environment(env), stdout=output, stdin=stdin,
                                stderr=errors if output is not None or errors != subprocess.STDOUT else None,
                                start_new_session=new_session, cwd=cwd, pass_fds=pass_fds)
    except FileNotFoundError:
        raise CommandFailed(f"{args[0]} is not installed (run `make setup`)") from None


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
