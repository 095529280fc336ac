"""The `appliance` command: composes the pipeline stages (load, keys, render, ...)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, TextIO

import click
from rich.table import Table

from . import __version__
from .errors import EXIT_INVALID, ApplianceError, InputError, LabError
from .fsutil import atomic_write
from .peer_config import client_config, find_peer, terminal_qr
from .profile import LoadedProfile, ProfileError, json_schema_text, load_profile, reference_markdown
from .profile.types import check_name, parse_host_port
from .render import ConfigTree, render
from .secrets import (
    ApplianceKeys,
    SecretStore,
    SecretStoreError,
    appliance_keys,
    default_store_path,
    keys_for,
    public_key,
)
from .ui import die, echo_json, err, out, step


class _Cli(click.Group):
    """One exit path for every command: an ApplianceError (a ProfileError with all its issues) is
    printed without a traceback and ends the run with its exit status (2: bad input; 1: failed)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ApplianceError as e:
            _report(e)


def _report(e: ApplianceError) -> NoReturn:
    if isinstance(e, ProfileError):
        for issue in e.issues:
            err.print(f"[red]{issue}[/]", markup=True, highlight=False, soft_wrap=True)
        err.print(f"[bold red]invalid profile[/]: {len(e.issues)} problem(s)")
        raise SystemExit(e.exit_code)
    die(str(e), e.exit_code)

secrets_option = click.option(
    "--secrets", "secrets_dir", type=click.Path(file_okay=False, path_type=Path), envvar="APPLIANCE_SECRETS",
    show_envvar=True,
    help="secret store holding the appliances' private and preshared keys [default: secrets/ at the top of the "
         "profile's git repository, or beside the profile when it is in none]")
profile_arg = click.argument("profile", type=click.Path(dir_okay=False, path_type=Path))


def _load(path: Path) -> LoadedProfile:
    return load_profile(path)


def _store(store_dir: Path | None, profile: Path | None) -> SecretStore:
    """--secrets, else the store of the profile's repository (see secrets.store)."""
    return SecretStore(store_dir if store_dir is not None else default_store_path(profile))


def _keys(store_dir: Path | None, loaded: LoadedProfile) -> ApplianceKeys:
    return keys_for(loaded, store_dir)


def _render(loaded: LoadedProfile, secrets_dir: Path | None) -> ConfigTree:
    return render(loaded.profile, _keys(secrets_dir, loaded))


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
def cli() -> None:
    """Declarative image builder for WireGuard edge appliances.

    One YAML profile per device: validate it, render its configuration, build a bootable image.
    """


@cli.command()
@click.argument("profiles", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print results as JSON on stdout")
def validate(profiles: tuple[Path, ...], as_json: bool) -> None:
    """Check profiles; errors name file:line:column and the field. Exit status 2 if any is invalid."""
    results = []
    for path in profiles:
        try:
            lp = load_profile(path)
        except ProfileError as e:
            results.append({"file": str(path), "valid": False, "errors": [i.to_json() for i in e.issues]})
            if not as_json:
                for issue in e.issues:
                    err.print(f"[red]{issue}[/]", soft_wrap=True)
            continue
        p = lp.profile
        results.append({"file": str(path), "valid": True, "name": p.name, "roles": list(p.roles),
                        "mode": p.dataplane.mode, "digest": lp.digest})
        if not as_json:
            out.print(f"[green]ok[/] {path}: {p.name} ({', '.join(p.roles)}, {p.dataplane.mode} dataplane)")
    if as_json:
        echo_json({"valid": all(r["valid"] for r in results), "profiles": results})
    if not all(r["valid"] for r in results):
        raise SystemExit(EXIT_INVALID)


@cli.command("render")
@profile_arg
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="directory to write the configuration tree to (replaced atomically)")
@click.option("--include-secrets", is_flag=True,
              help="also write the private/preshared key files (0600); off by default")
@secrets_option
def render_cmd(profile: Path, output: Path, include_secrets: bool, secrets_dir: Path | None) -> None:
    """Render PROFILE into the configuration tree the image will carry."""
    loaded = _load(profile)
    with step(f"render {loaded.profile.name}"):
        tree = _render(loaded, secrets_dir)
        try:
            tree.write(output, include_secrets=include_secrets)
        except OSError as e:  # FileExistsError: a directory that is no earlier render
            raise ApplianceError(str(e)) from None
    count = sum(1 for e in tree if e.kind == "file" and (include_secrets or not e.secret))
    out.print(f"{count} files in {output}")


@cli.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="write to this file instead of stdout")
@click.option("--markdown", is_flag=True, help="the profile reference as a Markdown table instead")
def schema(output: Path | None, markdown: bool) -> None:
    """Print the JSON Schema of profiles (for editors: yaml-language-server, VS Code)."""
    text = reference_markdown() if markdown else json_schema_text()
    if output:
        atomic_write(output, text)
    else:
        click.echo(text, nl=False)


@cli.command()
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="print as JSON")
@secrets_option
def keys(target: str, as_json: bool, secrets_dir: Path | None) -> None:
    """Show the public key of appliance TARGET (a name or a profile), creating its keys on first use.

    Private and preshared keys stay in the secret store and are never printed.
    """
    name, store = _target(target, secrets_dir)
    if isinstance(name, LoadedProfile):
        k = _keys(secrets_dir, name)
        name = name.profile.name
    else:
        k = store.appliance_keys(name, [])
    if as_json:
        echo_json({"name": name, "public_key": k.public_key, "preshared_key_peers": sorted(k.preshared_keys),
                   "store": str(store.root / name)})
    else:
        out.print(f"{name}: {k.public_key}")
        if k.preshared_keys:
            out.print(f"preshared keys for: {', '.join(sorted(k.preshared_keys))} (in {store.root / name})")


def _target(target: str, secrets_dir: Path | None) -> tuple[LoadedProfile | str, SecretStore]:
    """A profile (a .yaml path) or an appliance name, and its secret store. A name becomes a path in
    the store: it must be a hostname label (no '..', no '/')."""
    if target.endswith((".yaml", ".yml")) or os.sep in target:
        lp = _load(Path(target))
        return lp, _store(secrets_dir, lp.path)
    try:
        check_name(target)
    except ValueError as e:
        raise InputError(f"{target[:70]!r} is neither a profile (a .yaml file) nor an appliance name: {e}") from None
    return target, _store(secrets_dir, None)


@cli.command()
@profile_arg
@click.argument("peer_name", metavar="PEER")
@click.option("--endpoint", help="host:port of the appliance, if the profile has no wireguard.endpoint")
@click.option("--private-key-file", type=click.File("r"),
              help="the peer's own private key, to emit a complete config (else a placeholder)")
@click.option("--qr", is_flag=True, help="also show the config as a QR code for the mobile apps")
@secrets_option
def peer(profile: Path, peer_name: str, endpoint: str | None, private_key_file: TextIO | None,
         qr: bool, secrets_dir: Path | None) -> None:
    """Print a wg-quick config for PEER of the appliance in PROFILE."""
    loaded = _load(profile)
    p = loaded.profile
    entry = find_peer(p, peer_name)
    if entry is None:
        known = ", ".join(x.name for x in p.wireguard.peers) or "none"
        raise InputError(f"{profile}: no peer named '{peer_name[:70]}' (peers: {known})")
    if endpoint is not None:
        try:
            endpoint = parse_host_port(endpoint)
        except ValueError as e:
            raise InputError(f"--endpoint: {e}") from None
    k = _keys(secrets_dir, loaded)
    if private_key_file is not None:
        _warn_if_others_can_read(private_key_file)
    private = private_key_file.read().strip() if private_key_file else None
    if private is not None:
        try:
            matches = public_key(private) == entry.public_key
        except ValueError:
            matches = False
        if not matches:
            source = getattr(private_key_file, "name", "the key file")
            raise ApplianceError(f"the key in {source} does not belong to peer '{peer_name}' "
                             f"(public key {entry.public_key})")
    text = client_config(p, entry, k.public_key, k.preshared_keys.get(peer_name), private, endpoint)
    click.echo(text, nl=False)
    if qr:
        click.echo(terminal_qr(text), nl=False)


cache_option = click.option(
    "--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), envvar="APPLIANCE_CACHE",
    show_envvar=True, help="cache of tools and root trees [default: ~/.cache/appliance]")


@cli.command()
@profile_arg
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default="images", show_default=True,
              help="where NAME.img, .img.zst, .img.bmap and .manifest.json go")
@click.option("--no-cache", is_flag=True, help="rebuild the tools and root trees instead of reusing cached ones")
@click.option("--lock", "use_lock", is_flag=True,
              help="pin package versions to PROFILE.lock (written after the build if it does not exist)")
@click.option("--update-lock", is_flag=True, help="with --lock: take current versions and rewrite the lock")
@click.option("--no-verify", is_flag=True, help="skip the testinfra checks of the root tree")
@click.option("--keep-tree", is_flag=True, help="keep the staged root tree (holds the private key) for debugging")
@click.option("--render-only", is_flag=True, help="stop after rendering the configuration into OUT_DIR/NAME.config")
@click.option("--json", "as_json", is_flag=True, help="print the build manifest as JSON")
@click.option("--verify", "boot_verify", is_flag=True,
              help="then boot a lab variant in QEMU and run the traffic suite (as `appliance test`)")
@click.option("--age-identity", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="age identity for encrypted keys (*.key.age) [env: APPLIANCE_AGE_IDENTITY]")
@cache_option
@secrets_option
def build(profile: Path, out_dir: Path, no_cache: bool, use_lock: bool, update_lock: bool, no_verify: bool,
          keep_tree: bool, render_only: bool, as_json: bool, boot_verify: bool, age_identity: Path | None,
          cache_dir: Path | None, secrets_dir: Path | None) -> None:
    """Build the bootable disk image for PROFILE: OUT_DIR/NAME.img (GPT, UEFI) and friends.

    The root tree is cached per state of the Debian archive; without the archive, the newest cached
    one is used, and APPLIANCE_REUSE_BASE_DAYS=N takes it also while the archive is reachable if it is
    at most N days old."""
    from .image import BuildOptions, Cache
    from .secrets.crypt import IDENTITY_ENV
    from .verify import verify_tree

    if age_identity:
        os.environ[IDENTITY_ENV] = str(age_identity.resolve())

    with step(f"validate {profile}"):
        loaded = _load(profile)
    p = loaded.profile
    with step("keys and configuration"):
        keys = _keys(secrets_dir, loaded)
    if render_only:
        tree = render(p, keys)
        dest = out_dir / f"{p.name}.config"
        tree.write(dest)
        out.print(f"configuration for {p.name} in {dest} ({len(list(tree))} entries, digest {tree.digest()[:12]})")
        return
    opts = BuildOptions(out_dir=out_dir, cache=Cache(cache_dir), no_cache=no_cache,
                        lock_path=profile.with_suffix(".lock") if use_lock or update_lock else None,
                        update_lock=update_lock, check_tree=None if no_verify else verify_tree, keep_tree=keep_tree)
    result = _build_image(loaded, keys, opts)
    if result.kept_tree:
        err.print(f"kept root tree: {result.kept_tree} (it holds the private key: delete it when done)")
    if as_json:
        echo_json(result.manifest.to_json())
        return
    img, zst = result.output(".img"), result.output(".img.zst")
    out.print(f"[green]built[/] {result.image}: {img.size / 2**20:.0f} MiB raw, "
              f"{(img.allocated or 0) / 2**20:.0f} MiB allocated, {zst.size / 2**20:.1f} MiB zstd, "
              f"sha256 {img.sha256[:16]}… in {result.timings['total']:.1f} s")
    if boot_verify:
        ctx = click.get_current_context()
        ctx.invoke(test_cmd, profile=profile, keep=False, out_dir=out_dir, as_json=False, cache_dir=cache_dir)


def _require_tested(built: dict[str, Any], untested: bool) -> None:
    """The update's gate: each image (its profile, appliance code and packages) passed `appliance test`
    in this checkout (its manifest's "tested"), unless --untested. Before any device is touched."""
    names = [name for name, result in built.items() if result.manifest.tested is None]
    if names and not untested:
        raise InputError(f"not tested in this checkout: {', '.join(names)}: an image whose profile, appliance code "
                         "and packages has not passed `appliance test` (run it first, or --untested); no device "
                         "was touched")


def _update_device(target: Any, result: Any, loaded: LoadedProfile, tools: Any, **options: Any) -> Any:
    """`update` of one device to its built image, with the image's commit for the downgrade check."""
    import tempfile

    from .image import image_spec
    from .update import update

    with tempfile.TemporaryDirectory(prefix=f"appliance-update-{loaded.profile.name}-") as work:
        return update(target, result.image.resolve(), image_spec(loaded.profile), tools, Path(work),
                      say=lambda m: err.print(m), source=result.manifest.profile.source,
                      repo=loaded.path.resolve().parent, **options)


def _build_image(loaded: LoadedProfile, keys: ApplianceKeys, opts: Any) -> Any:
    from .image import ImageError, build_loaded, profile_info

    try:
        return build_loaded(loaded.profile, keys, profile_info(loaded), opts, step)
    except ImageError as e:
        raise ImageError(f"build of {loaded.profile.name} failed: {e}") from None


host_option = click.option("--host", "host", required=True, metavar="[USER@]HOST[:PORT]",
                           help="the device, over SSH (user root unless given; the profile's authorized key)")
ssh_config_option = click.option("--ssh-config", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                                 help="an ssh_config file for the connection (ssh -F)")


@cli.command("update")
@profile_arg
@host_option
@ssh_config_option
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default="images", show_default=True)
@click.option("--timeout", type=float, default=900, show_default=True,
              help="seconds to wait for the device to come back with a verdict")
@click.option("--full", is_flag=True,
              help="send the whole root, reusing none of the device's running root (slower; a suspect device)")
@click.option("--allow-downgrade", is_flag=True,
              help="install even when the device runs a later commit of the profile's repository")
@click.option("--untested", is_flag=True,
              help="send an image whose profile, code and packages have not passed `appliance test` here")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@cache_option
@secrets_option
def update_cmd(profile: Path, host: str, ssh_config: Path | None, out_dir: Path, timeout: float, full: bool,
               allow_downgrade: bool, untested: bool, as_json: bool, cache_dir: Path | None,
               secrets_dir: Path | None) -> None:
    """Update a running device to PROFILE's image: build it if it is not current, write its root into
    the slot the device is not running, reboot, and report how the new root came up.

    Exit status: 0 updated (the new root booted and passed appliance-health: it is blessed);
    3 rolled back (the new root was unhealthy: the device is back on the previous root, the
    device's reason is shown); 4 unreachable (no answer from the device within --timeout);
    1 the update failed before the reboot (nothing changed on the device); 2 bad input."""

    from .image import BuildOptions, Cache, image_spec
    from .ui import progress_bar
    from .update import EXIT_ROLLED_BACK, EXIT_UNREACHABLE, Outcome, Target, require_updatable
    from .verify import verify_tree

    target = Target.parse(host, ssh_config)
    with step(f"validate {profile}"):
        loaded = _load(profile)
    p = loaded.profile
    require_updatable(image_spec(p))  # before minutes of building
    with step("keys and configuration"):
        keys = _keys(secrets_dir, loaded)
    cache = Cache(cache_dir)
    result = _build_image(loaded, keys, BuildOptions(out_dir=out_dir, cache=cache, check_tree=verify_tree))
    _require_tested({p.name: result}, untested)
    with progress_bar("root and UKI") as bar:
        report = _update_device(target, result, loaded, result.tools(cache), progress=bar, boot_timeout=timeout,
                                reuse=not full, allow_downgrade=allow_downgrade)
    if as_json:
        echo_json(report.to_json())
    else:
        sent = (f"{report.sent_bytes / 2**20:.1f} MiB sent: {report.payload_bytes / 2**20:.1f} of "
                f"{report.root_bytes / 2**20:.1f} MiB were new to the device, compressed")
        if report.outcome == Outcome.UPDATED:
            out.print(f"[green]updated[/] {target.host}: {report.entry} on slot {report.slot} is blessed ({sent})")
        elif report.outcome == Outcome.ROLLED_BACK:
            why = report.why()
            out.print(f"[red]rolled back[/] {target.host}: {report.entry} was unhealthy ({why or 'no reason kept'});"
                      " the previous root runs")
        else:
            out.print(f"[red]unreachable[/] {target.host}: no verdict within {timeout:.0f} s")
    if report.outcome == Outcome.ROLLED_BACK:
        raise SystemExit(EXIT_ROLLED_BACK)
    if report.outcome == Outcome.UNREACHABLE:
        raise SystemExit(EXIT_UNREACHABLE)


@cli.command("status")
@host_option
@ssh_config_option
@click.option("--json", "as_json", is_flag=True, help="print the device's status as JSON")
def status_cmd(host: str, ssh_config: Path | None, as_json: bool) -> None:
    """A device's running root and slot, the other slot's, the boot entries and the last health
    verdicts, and its peers' handshakes. Exit status 4 when the device does not answer."""
    from .image.provenance import Source
    from .update import EXIT_UNREACHABLE, Target, problems

    target = Target.parse(host, ssh_config)
    st = target.status()
    if st is None:
        err.print(f"[red]unreachable[/] {target.host}")
        raise SystemExit(EXIT_UNREACHABLE)
    from .dataplane.metrics import parse_dump

    st["peers"] = [{"interface": p.interface, "public_key": p.public_key, "latest_handshake": p.latest_handshake,
                    "rx_bytes": p.rx_bytes, "tx_bytes": p.tx_bytes}
                   for p in parse_dump(target.run("wg show all dump", timeout=30).stdout)]
    if as_json:
        echo_json(st)
        return
    table = Table(title=f"{target.host}: {st['release'].get('name', '?')}, slot {st['booted_slot']} running")
    table.add_column("entry")
    table.add_column("slot")
    table.add_column("state")
    for e in st["entries"]:
        table.add_row(e["file"], e["slot"] + (" (running)" if e["slot"] == st["booted_slot"] else ""), e["state"])
    out.print(table)
    source = Source.from_json(st["release"].get("source"))
    out.print(f"built from: {source.describe() if source else 'no git commit recorded'}")
    health = st.get("health") or {}
    out.print(f"health: {'healthy' if health.get('healthy') else 'UNHEALTHY'} "
              + problems(health))
    now = int(time.time())
    for peer in st["peers"]:
        age = f"{now - peer['latest_handshake']} s ago" if peer["latest_handshake"] else "never"
        out.print(f"peer {peer['public_key'][:12]}… handshake {age}, rx {peer['rx_bytes']} B, tx {peer['tx_bytes']} B")


@cli.command("rollback")
@host_option
@ssh_config_option
def rollback_cmd(host: str, ssh_config: Path | None) -> None:
    """Boot the device's other root now (the previous one, if it was blessed)."""
    from .update import Target

    target = Target.parse(host, ssh_config)
    proc = target.run("/usr/sbin/appliance-dataplane slot rollback", timeout=60)
    if proc.returncode != 0:
        raise ApplianceError(f"{target.host}: {proc.stderr.strip() or 'no answer'}")
    out.print(proc.stdout.strip())


@cli.group("cache")
def cache_group() -> None:
    """Inspect or clean the cache of tools trees, root trees and ESPs."""


@cache_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="print as JSON")
@cache_option
def cache_ls(as_json: bool, cache_dir: Path | None) -> None:
    """List cached trees with their size and age."""
    from .image import Cache
    from .image.cache import dir_size

    cache = Cache(cache_dir)
    rows: list[dict[str, Any]] = []
    for e in cache.entries():
        meta = e.meta() if e.complete else {}
        created = meta.get("created")
        rows.append({"kind": e.kind, "key": e.key, "path": str(e.path), "complete": e.complete,
                     "bytes": dir_size(e.path), "created": created, "kernel": meta.get("kernel_version")})
    if as_json:
        echo_json({"cache": str(cache.root), "entries": rows})
        return
    out.print(f"cache: {cache.root}")
    for r in rows:
        age = f"{(time.time() - float(r['created'])) / 3600:.1f} h" if r["created"] else "incomplete"
        out.print(f"  {r['kind']:6} {r['key']}  {int(r['bytes']) / 2**20:8.1f} MiB  {age}")


@cache_group.command("clean")
@click.option("--older-than", type=float, metavar="DAYS", help="only entries not used for DAYS days")
@click.option("--all", "clean_all", is_flag=True, help="also remove the downloaded .deb files")
@cache_option
def cache_clean(older_than: float | None, clean_all: bool, cache_dir: Path | None) -> None:
    """Remove cached trees (they are rebuilt by the next build that needs them)."""
    from .image import Cache
    from .image.cache import COMPLETE

    cache = Cache(cache_dir)
    cutoff = time.time() - older_than * 86400 if older_than is not None else None

    def keep(e: Any) -> bool:
        return cutoff is not None and e.complete and (e.path / COMPLETE).stat().st_mtime >= cutoff

    removed = cache.clean(keep=keep)
    if clean_all:
        shutil.rmtree(cache.root / "debs", ignore_errors=True)
    out.print(f"removed {len(removed)} entries from {cache.root}")


@cli.command("test")
@profile_arg
@click.option("--keep", is_flag=True, help="keep the work directory (image, console log, suite output)")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default="images", show_default=True,
              help="where a pass is recorded (NAME.tested.json, which `appliance update` asks for)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@cache_option
def test_cmd(profile: Path, keep: bool, out_dir: Path, as_json: bool, cache_dir: Path | None) -> None:
    """Boot a lab variant of PROFILE's image in QEMU, with a lab network of peers, upstream and LAN,
    and run the testinfra suite generated from the profile, with real traffic through the tunnel.

    The lab variant carries the lab's keys for the declared peers and the lab's SSH key; everything
    else is the image `appliance build` makes. A pass is recorded in OUT_DIR/NAME.tested.json for
    this profile, appliance code and Debian packages. Needs root."""
    from .image import Cache
    from .image.tested import write_record
    from .verify.boot import BootTest

    loaded = _load(profile)
    test = BootTest(loaded.profile, Cache(cache_dir), step, keep=keep)
    try:
        report = test.run()
    except (ApplianceError, subprocess.SubprocessError, OSError) as e:
        tail = "\n".join(str(e).splitlines()[-60:])
        raise LabError(f"{loaded.profile.name}: the lab did not come up: {tail}"
                       + (f" (kept in {test.workdir})" if keep else "")) from None
    if as_json:
        echo_json({"name": report.name, "ok": report.ok, "passed": report.passed, "failed": report.failed,
                   "failures": report.failures, "timings": report.timings, "accel": report.accel,
                   "emulator_faults": len(report.emulator_faults)})
    else:
        table = Table(title=f"appliance test {report.name} ({report.accel})")
        table.add_column("check")
        table.add_column("result")
        for failure in report.failures:
            table.add_row(failure, "[red]failed[/]")
        table.add_row(f"{report.passed} checks", "[green]passed[/]")
        for k, v in report.timings.items():
            table.add_row(k.replace("_", " "), f"{v:.1f} s")
        if report.emulator_faults:  # see verify.boot.emulator_fault
            table.add_row("boots retried: the guest kernel died of TCG (Oops: int3)",
                          str(len(report.emulator_faults)))
        out.print(table)
    if keep:
        err.print(f"work directory: {test.workdir}")
    if report.ok and test.manifest is not None:
        write_record(out_dir, report.name, loaded.digest, test.manifest.packages,
                     {"passed": report.passed, "accel": report.accel, "timings": report.timings})
    if not report.ok:
        if not as_json:
            err.print(report.output[-6000:])
        raise SystemExit(1)


@cli.command("run")
@profile_arg
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default="images", show_default=True)
@click.option("--persist", is_flag=True, help="write changes to the image (default: a throwaway overlay)")
def run_cmd(profile: Path, out_dir: Path, persist: bool) -> None:
    """Boot OUT_DIR/NAME.img of PROFILE in QEMU with its serial console on this terminal."""
    from .image import image_spec
    from .verify.vm import run_interactive

    loaded = _load(profile).profile
    image = out_dir / f"{loaded.name}.img"
    if not image.exists():
        raise ApplianceError(f"{image} does not exist: run `appliance build {profile}` first")
    spec = image_spec(loaded)
    if spec.boot.kind == "rpi":  # booted as its firmware would, in raspi4b (no network there)
        import tempfile

        from .verify import raspi
        if persist:
            raise InputError("--persist: a Pi image boots in QEMU's raspi4b on an overlay only")
        with tempfile.TemporaryDirectory(prefix="appliance-run-") as work:
            raise SystemExit(raspi.run_interactive(image.resolve(), spec.platform, spec.boot, Path(work)))
    raise SystemExit(run_interactive(image.resolve(), persist, spec.platform, hardware=not spec.vm))


@cli.command("flash")
@click.argument("image", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("device", type=click.Path(path_type=Path))
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--force", is_flag=True, help="allow a whole disk that is neither removable nor USB")
@click.option("--allow-loop", is_flag=True, help="allow a loop device (an image file attached with losetup)")
@click.option("--verify-only", is_flag=True, help="only compare DEVICE with IMAGE (write nothing)")
def flash_cmd(image: Path, device: Path, yes: bool, force: bool, allow_loop: bool, verify_only: bool) -> None:
    """Write IMAGE to DEVICE (SD card, USB stick, disk) with bmaptool, then read it back and verify.

    Refuses anything but a whole disk (partitions, LVM, dm-crypt, RAID; loop devices unless
    --allow-loop), devices in use (mounted, swap, a RAID/LVM/LUKS member), the running system's root
    or swap, devices smaller than the image, and disks that are neither removable nor USB unless
    --force."""
    from . import flash

    bmap = image.with_name(image.name + ".bmap")
    bmap_or_none = bmap if bmap.exists() else None
    target = flash.inspect_target(device)
    if not verify_only:
        _flash_write(image, target, bmap_or_none, yes, force, allow_loop)
    with step(f"read back and verify {target.path}"):
        n = flash.verify(image, target.path, bmap_or_none)
    out.print(f"[green]verified[/] {n / 2**20:.0f} MiB on {target.path} match {image.name}")


def _flash_write(image: Path, target: Any, bmap: Path | None, yes: bool, force: bool, allow_loop: bool) -> None:
    from . import flash

    reasons = flash.refusals(target, image.stat().st_size, force, allow_loop)
    if reasons:
        raise flash.FlashError(f"refusing to write to {target.path}: " + "; ".join(reasons))
    out.print(target.describe())
    if not yes:
        try:
            answer = click.confirm(f"Erase {target.path} and write {image.name}?", default=False, err=True)
        except click.Abort:
            answer = False
        if not answer:
            raise flash.FlashError("nothing written (--yes skips the question)")
    if bmap is None:
        err.print("[yellow]warning:[/] no .bmap beside the image: every block is written")
    with step(f"write {image.name} to {target.path}" + (" (bmaptool)" if bmap else "")):
        flash.write(image, target.path, bmap, lambda m: err.print(m))


@cli.group("fleet")
def fleet_group() -> None:
    """Work on every profile of a fleet directory (usually a git repository)."""


@fleet_group.command("check")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path), default=".")
@click.option("--json", "as_json", is_flag=True, help="print results as JSON")
def fleet_check(directory: Path, as_json: bool) -> None:
    """Validate every device profile under DIRECTORY and the rules across them: unique names, tunnel
    addresses and endpoints; one public key per peer name. Exit status 2 on any problem."""
    from . import fleet

    result = fleet.check(directory)
    if as_json:
        echo_json({"ok": result.ok, "devices": [lp.profile.name for lp in result.loaded],
                   "issues": [i.to_json() for i in result.issues]})
    else:
        for issue in result.issues:
            err.print(f"[red]{issue}[/]")
        out.print(f"{len(result.loaded)} devices checked, {len(result.issues)} problem(s)")
    if not result.ok:
        raise SystemExit(EXIT_INVALID)


@fleet_group.command("diff")
@click.argument("rev1")
@click.argument("rev2")
@click.argument("directory", default=".")
@click.option("--repo", type=click.Path(file_okay=False, exists=True, path_type=Path), default=".",
              help="the git repository (default: the current directory)")
@click.option("--stat", "stat_only", is_flag=True, help="only which devices and images change")
def fleet_diff(rev1: str, rev2: str, directory: str, repo: Path, stat_only: bool) -> None:
    """Render every device at REV1 and REV2 and show how each device's configuration changes (keys
    are never read: placeholders stand in) and which images would be rebuilt."""
    from . import fleet

    results = fleet.diff(repo, rev1, rev2, directory)
    table = Table(title=f"fleet diff {rev1}..{rev2}")
    for col in ("device", "change", "image"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, r.status, r.image_changes or "unchanged")
    if not stat_only:
        for r in results:
            if r.diff:
                click.echo(f"### {r.name}")
                click.echo(r.diff, nl=False)
    out.print(table)


@fleet_group.command("build")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path), default=".")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default="images", show_default=True)
@cache_option
@secrets_option
def fleet_build(directory: Path, out_dir: Path, cache_dir: Path | None, secrets_dir: Path | None) -> None:
    """Build every device profile under DIRECTORY (sharing cached root trees); a failure in one does
    not stop the others. Exit status 1 if any failed."""
    from . import fleet
    from .image import BuildOptions, Cache, ImageError, build_profile
    from .verify import verify_tree

    table = Table(title=f"fleet build {directory}")
    for col in ("device", "roles", "mode", "image", "sha256", "time", "result"):
        table.add_column(col)
    failed = 0
    for path in fleet.device_profiles(directory):
        t0 = time.monotonic()
        try:
            res = build_profile(path, BuildOptions(out_dir=out_dir, cache=Cache(cache_dir), check_tree=verify_tree),
                                step, secrets=secrets_dir, root=fleet.fleet_root(directory))
            p = res.profile
            if p is None:
                raise ImageError(f"{path}: built without its profile")
            table.add_row(p.name, ", ".join(p.roles), p.dataplane.mode,
                          f"{res.output('.img.zst').size / 2**20:.1f} MiB zstd", res.output(".img").sha256[:12],
                          f"{time.monotonic() - t0:.0f} s", "[green]built[/]")
        except (ProfileError, ImageError, SecretStoreError) as e:
            failed += 1
            err.print(f"[red]{path}: {e}[/]")
            table.add_row(path.stem, "", "", "", "", f"{time.monotonic() - t0:.0f} s", "[red]failed[/]")
    out.print(table)
    if failed:
        raise SystemExit(1)


@fleet_group.command("update")
@click.argument("directory", type=click.Path(file_okay=False, exists=True, path_type=Path), default=".")
@click.option("--inventory", required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="YAML: devices (name: [USER@]HOST[:PORT]), canary, batch")
@ssh_config_option
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default="images", show_default=True)
@click.option("--timeout", type=float, default=900, show_default=True,
              help="seconds to wait for each device to come back with a verdict")
@click.option("--allow-downgrade", is_flag=True, help="as for `appliance update`")
@click.option("--untested", is_flag=True, help="as for `appliance update`")
@click.option("--json", "as_json", is_flag=True, help="print each device's result as JSON")
@cache_option
@secrets_option
def fleet_update(directory: Path, inventory: Path, ssh_config: Path | None, out_dir: Path, timeout: float,
                 allow_downgrade: bool, untested: bool, as_json: bool, cache_dir: Path | None,
                 secrets_dir: Path | None) -> None:
    """Update the inventory's devices to their profiles under DIRECTORY: every image is built (and
    must have passed `appliance test`, unless --untested) before any device is touched; then the
    canary alone, then batches in parallel; the rollout stops after the first step in which a
    device rolled back, was unreachable or failed.

    Exit status: 0 all updated; 3 a device rolled back; 4 one was unreachable; 1 one failed
    before its reboot; 2 bad input (the inventory, a profile, an untested image)."""

    from . import fleet
    from .image import BuildOptions, Cache, image_spec
    from .rollout import exit_status, load_inventory, rollout
    from .update import Target, require_updatable
    from .verify import verify_tree

    plan = load_inventory(inventory)
    checked = fleet.check(directory)
    if not checked.ok:
        raise ProfileError(checked.issues)
    by_name = {lp.profile.name: lp for lp in checked.loaded}
    unknown = [n for n in plan.devices if n not in by_name]
    if unknown:
        raise InputError(f"{inventory}: no profile under {directory} for {', '.join(unknown)}")
    for name in plan.order():
        require_updatable(image_spec(by_name[name].profile))
    cache = Cache(cache_dir)
    built = {}
    for name in plan.order():
        with step(f"keys and configuration of {name}"):
            keys = _keys(secrets_dir, by_name[name])
        built[name] = _build_image(by_name[name], keys,
                                   BuildOptions(out_dir=out_dir, cache=cache, check_tree=verify_tree))
    _require_tested(built, untested)
    def update_one(name: str) -> Any:
        return _update_device(Target.parse(plan.devices[name], ssh_config), built[name], by_name[name],
                              built[name].tools(cache),
                              progress=lambda d, t: None, boot_timeout=timeout, allow_downgrade=allow_downgrade)

    results = rollout(plan.order(), plan.batch, update_one)
    if as_json:
        echo_json({"devices": [r.to_json() for r in results],
                   "not_in_inventory": sorted(set(by_name) - set(plan.devices))})
    else:
        table = Table(title=f"fleet update {directory}")
        for col in ("device", "host", "result", "entry", "sent", "why"):
            table.add_column(col)
        for r in results:
            rep = r.report
            why = r.error or (rep.why() if rep else "")
            table.add_row(r.name, plan.devices[r.name], str(r.state), rep.entry if rep else "",
                          f"{rep.sent_bytes / 2**20:.1f} MiB" if rep else "", why[:200])
        out.print(table)
    raise SystemExit(exit_status(results))


@cli.group("secrets")
def secrets_group() -> None:
    """Encrypt the secret store with age so it can live in the fleet's git repository."""


@secrets_group.command("encrypt")
@click.argument("target")
@click.option("--recipient", "-r", "recipient_list", multiple=True, help="age public key (age1...); repeatable")
@click.option("--recipients-file", "-R", type=click.File("r"), help="file with one age recipient per line")
@click.option("--remove-plaintext", is_flag=True, help="delete each key file once its .age file is written")
@secrets_option
def secrets_encrypt(target: str, recipient_list: tuple[str, ...], recipients_file: TextIO | None,
                    remove_plaintext: bool, secrets_dir: Path | None) -> None:
    """Write KEY.age beside every key of appliance TARGET (a name or a profile), for the recipients.

    The .age files can be committed; builds decrypt them in memory with --age-identity or
    $APPLIANCE_AGE_IDENTITY. Keys are created first if the appliance has none yet."""
    from .secrets.crypt import encrypt_file, recipients

    texts = list(recipient_list) + ([ln for ln in recipients_file.read().splitlines() if ln.strip()
                                     and not ln.startswith("#")] if recipients_file else [])
    if not texts:
        raise ApplianceError("give at least one --recipient age1... (or --recipients-file)")
    found, store = _target(target, secrets_dir)
    to = recipients(texts)
    if isinstance(found, LoadedProfile):
        name = found.profile.name
        appliance_keys(store, found.profile)
    else:
        name = found
        store.appliance_keys(name, [])
    written = [encrypt_file(f, to) for f in store.key_files(name)]
    if remove_plaintext:
        for f in store.key_files(name):
            f.unlink()
    for w in written:
        out.print(f"wrote {w}")


def _warn_if_others_can_read(f: TextIO) -> None:
    """As wg does for its key files: a private key others can read is no longer private."""
    try:
        mode = os.fstat(f.fileno()).st_mode
    except (OSError, ValueError, io.UnsupportedOperation):
        return
    if stat.S_ISREG(mode) and mode & 0o077:
        err.print(f"[yellow]warning:[/] {getattr(f, 'name', 'the key file')} is accessible by others "
                  f"(mode {stat.S_IMODE(mode):04o}): run chmod 600 on it")


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C, so `finally` blocks remove temporary files and staged trees
    raise KeyboardInterrupt


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    # click's standalone mode turns Ctrl-C into "Aborted!" and exit 1; a shell's convention is 130
    try:
        code = cli.main(standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort as e:
        if not isinstance(e.__context__, KeyboardInterrupt):
            err.print("Aborted!")
            sys.exit(1)
        err.print("interrupted")
        sys.exit(130)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
