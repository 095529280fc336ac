"""`appliance build`: tools tree -> base tree -> staged tree -> verified -> GPT image and its outputs.

The build is a list of steps over one BuildContext, as mkosi's build_image(context): each step says
whether it applies and reads what earlier steps left in the context. Outputs are written under hidden
temporary names in the output directory and renamed at the very end, the image last: a failed or
killed build leaves no NAME.img (and the next build sweeps up what a killed one left behind)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..dataplane.slots import RELEASE_JSON
from ..errors import InputError
from ..profile import Profile
from ..render.tree import ConfigTree
from .assemble import build_data_fs, build_esp, build_root_fs, build_uki, write_disk
from .cache import Cache, CacheKind, content_key
from .debian import REUSE_ENV, Archive, ArchiveState, reuse_window
from .disk import ESP_SIZE, ESP_TYPE, DiskIds, Layout, Slot, kernel_cmdline, layout, system_files, uki_entry
from .lock import Lock
from .manifest import BuildManifest, OutputFile, ProfileInfo
from .netstack import IMAGE_PATH as NETSTACK_PATH
from .netstack import build_netstack
from .outputs import allocated, bmap, compress, sha256, write_manifest
from .rootfs import BaseTree, build_base, reusable_base
from .rpi_boot import boot_files, build_rpi_boot
from .run import BuildLog, ImageError, require_root
from .spec import ImageSpec
from .stage import remove_tree, split_var, stage_tree
from .tested import matching_record, packages_digest
from .tools import ToolsTree, build_tools, efi_binaries, unpacked_packages

ESP_RECIPE = 3  # bump when the way the ESP is made changes
RPI_BOOT_RECIPE = 1  # the same for the Pi's boot partition
DEFAULT_SOURCE_DATE_EPOCH = 1735689600  # 2025-01-01: used when neither lock nor environment sets one

Step = Callable[[str], AbstractContextManager[None]]


class TreeCheckResult(Protocol):
    """What a tree check reports (verify.TreeVerification is one)."""

    @property
    def ok(self) -> bool: ...
    @property
    def failed(self) -> int: ...
    @property
    def failures(self) -> list[str]: ...
    @property
    def output(self) -> str: ...


# The checks of a staged root tree: (tree, expectations, work directory) -> result. The image stage
# runs them but does not know them: the caller passes them in (verify.verify_tree), so that image
# never imports verify, which builds images for its labs.
TreeCheck = Callable[[Path, dict[str, Any], Path], TreeCheckResult]


@dataclass(frozen=True)
class BuildOptions:
    out_dir: Path = Path("images")
    cache: Cache = field(default_factory=Cache)
    no_cache: bool = False
    lock_path: Path | None = None  # with --lock: read it if it exists, else write it
    update_lock: bool = False
    check_tree: TreeCheck | None = None  # None: the tree is not checked (--no-verify)
    keep_tree: bool = False
    source_date_epoch: int | None = None


@dataclass
class BuildResult:
    image: Path
    manifest: BuildManifest
    timings: dict[str, float]
    kept_tree: Path | None = None
    profile: Profile | None = None  # what was built (build_loaded fills it in)

    def output(self, suffix: str) -> OutputFile:
        """The output NAME+suffix (".img", ".img.zst", ".img.bmap")."""
        return self.manifest.outputs[f"{self.manifest.name}{suffix}"]

    def tools(self, cache: Cache) -> ToolsTree:
        """The tools tree this build used (what an update of its image runs in): no second look at the archive."""
        return ToolsTree(cache.entry(CacheKind.TOOLS, self.manifest.tools_key))


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    return {"img": out_dir / f"{name}.img", "zst": out_dir / f"{name}.img.zst",
            "bmap": out_dir / f"{name}.img.bmap", "manifest": out_dir / f"{name}.manifest.json"}


@dataclass
class BuildContext:
    """One build: its inputs, then what each step makes."""

    spec: ImageSpec
    config: ConfigTree
    profile: ProfileInfo
    opts: BuildOptions
    step: Step
    log: BuildLog
    out_dir: Path
    archive: Archive
    lock: Lock | None
    sde: int
    work: Path
    paths: dict[str, Path]
    tmp: dict[str, Path]
    ids: DiskIds  # from the appliance's name: the staged tree (ESP mount) and the disk need them
    reuse_window: float  # seconds: how much older an archive state's base tree may be (rootfs.reuse_window)
    t_start: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    archive_state: ArchiveState | None = None
    tools: ToolsTree | None = None
    base: BaseTree | None = None
    tree: Path | None = None
    cmdline: str = ""
    esp: Path | None = None
    layout: Layout | None = None
    outputs: dict[str, OutputFile] = field(default_factory=dict)
    manifest: BuildManifest | None = None

    def need(self, value: Any, what: str) -> Any:
        """What an earlier step made (a step list in the wrong order fails here, by name)."""
        if value is None:
            raise ImageError(f"internal: the build step for {what} has not run")
        return value


@dataclass(frozen=True)
class BuildStep:
    title: str
    key: str  # its timing's name in the manifest
    run: Callable[[BuildContext], None]
    applies: Callable[[BuildContext], bool] = lambda ctx: True


def build_image(spec: ImageSpec, config: ConfigTree, profile: ProfileInfo, opts: BuildOptions,
                step: Step, log: BuildLog) -> BuildResult:
    require_root("building an image")
    try:
        return _build(spec, config, profile, opts, step, log)
    except OSError as e:  # a full disk, a vanished directory: say which file, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        raise ImageError(f"{e.strerror or e}{where}") from None


def _context(spec: ImageSpec, config: ConfigTree, profile: ProfileInfo, opts: BuildOptions, step: Step,
             log: BuildLog) -> BuildContext:
    out_dir = opts.out_dir.resolve()  # tools run chrooted: paths must be absolute
    lock = None
    if opts.lock_path and opts.lock_path.exists() and not opts.update_lock:
        lock = Lock.read(opts.lock_path)
    sde = lock.source_date_epoch if lock else (opts.source_date_epoch or source_date_epoch())
    paths = output_paths(out_dir, spec.name)
    return BuildContext(
        spec=spec, config=config, profile=profile, opts=opts, step=step, log=log, out_dir=out_dir,
        archive=Archive.from_env(), lock=lock, sde=sde, reuse_window=reuse_window(),
        work=opts.cache.root.resolve() / "work" / f"{spec.name}-{os.getpid()}", paths=paths,
        tmp={k: p.with_name(f".{p.name}.tmp-{os.getpid()}") for k, p in paths.items()},
        ids=DiskIds.for_name(spec.name))


def source_date_epoch(env: dict[str, str] | None = None) -> int:
    """The environment's SOURCE_DATE_EPOCH (reproducible-builds.org: seconds since 1970, UTC)."""
    raw = (os.environ if env is None else env).get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return DEFAULT_SOURCE_DATE_EPOCH
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) < 2**32:
        raise InputError(f"SOURCE_DATE_EPOCH={raw[:40]!r}: expected seconds since 1970-01-01 UTC "
                         "(a whole number, e.g. 1735689600)")
    return int(raw)


def _build(spec: ImageSpec, config: ConfigTree, profile: ProfileInfo, opts: BuildOptions, step: Step,
           log: BuildLog) -> BuildResult:
    ctx = _context(spec, config, profile, opts, step, log)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    opts.cache.root.mkdir(parents=True, exist_ok=True)
    os.chmod(opts.cache.root, 0o700)  # staged trees inside hold private keys while a build runs
    sweep_leftovers(ctx.out_dir, opts.cache, spec.name)
    try:
        for s in STEPS:
            if s.applies(ctx):
                with _timed(ctx, s):
                    s.run(ctx)
    finally:
        for p in ctx.tmp.values():
            p.unlink(missing_ok=True)
        if not opts.keep_tree:
            remove_tree(ctx.work)
    ctx.timings["total"] = round(time.time() - ctx.t_start, 2)
    return BuildResult(ctx.paths["img"], ctx.need(ctx.manifest, "the manifest"), ctx.timings,
                       ctx.tree if opts.keep_tree else None)


@contextmanager
def _timed(ctx: BuildContext, s: BuildStep) -> Iterator[None]:
    t0 = time.monotonic()
    if s.title:
        with ctx.step(s.title):
            yield
    else:
        yield
    if s.title:
        ctx.timings[s.key] = round(time.monotonic() - t0, 2)


# --- the steps, in order ---------------------------------------------------------------------------


def _tools(ctx: BuildContext) -> None:
    # the archive's state decides which cached trees are current; a lock pins the root tree's packages,
    # not the tools' (the boot loader and UKI stub among them), which follow the archive
    ctx.archive_state = ArchiveState(ctx.archive.snapshot(), ctx.reuse_window)
    ctx.tools = build_tools(ctx.opts.cache, ctx.archive, ctx.log, rebuild=ctx.opts.no_cache, state=ctx.archive_state)


def _base(ctx: BuildContext) -> None:
    opts = ctx.opts
    snapshot = None if ctx.lock else ctx.need(ctx.archive_state, "the archive's state").snapshot
    if ctx.lock is None and not opts.no_cache:
        cached = reusable_base(opts.cache, ctx.spec, ctx.archive, ctx.sde, snapshot, ctx.reuse_window)
        if cached is not None:
            why = "archive unreachable" if snapshot is None else f"archive moved, {REUSE_ENV} allows it"
            ctx.log.write(f"{why}: reusing the base tree built from the archive of "
                          f"{cached.entry.meta().get('snapshot')}\n")
            ctx.base = cached
            return
    if snapshot is None and ctx.lock is None:
        raise ImageError("cannot reach the Debian archive to build the root tree (and nothing is cached)")
    ctx.base = build_base(opts.cache, ctx.need(ctx.tools, "the tools tree"), ctx.archive, ctx.spec, ctx.log,
                          snapshot=snapshot, lock=ctx.lock, sde=ctx.sde, rebuild=opts.no_cache)


def _netstack(ctx: BuildContext) -> None:
    binary = build_netstack(ctx.opts.cache, ctx.archive, ctx.log, ctx.spec.platform)
    ctx.config.file(NETSTACK_PATH, binary.read_bytes(), mode=0o755)


def _stage(ctx: BuildContext) -> None:
    # what the root is made of, not where it was cached: a locked rebuild of a fresh base is the same
    packages = ctx.need(ctx.base, "the base tree").packages
    source = ctx.profile.source.to_json() if ctx.profile.source else None
    release = {"name": ctx.spec.name, "config_digest": ctx.config.digest(), "profile_digest": ctx.profile.digest,
               "source": source,
               "packages_digest": packages_digest(packages)}
    ctx.config.file(RELEASE_JSON, json.dumps(release, indent=2, sort_keys=True) + "\n")
    for path, text in system_files(ctx.ids).items():
        ctx.config.file(path, text)
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.tree = stage_tree(ctx.need(ctx.base, "the base tree"), ctx.config, ctx.work / "tree", ctx.sde,
                          ctx.need(ctx.tools, "the tools tree"), ctx.log, ctx.spec.emulator_env)


def tree_expectations(config: ConfigTree, spec: ImageSpec) -> dict[str, Any]:
    """What the tree checks (verify/tree_suite.py) expect of a staged root tree."""
    return {
        "config": config.manifest(),
        "enabled_units": [*spec.enable_units, *spec.appliance_units],
        "packages": list(spec.packages),
        "secret_paths": [e.path for e in config if e.secret],
        # its programs run through qemu-user: nft's netfilter netlink is not translated (see
        # _check_ruleset_foreign)
        "foreign_arch": spec.emulated,
        "emulator_env": spec.emulator_env,  # the environment the checks' commands run in
        "kernel_modules": list(spec.modules_keep),
    }


def _check_tree(ctx: BuildContext) -> None:
    check = ctx.need(ctx.opts.check_tree, "the tree checks")
    tree = ctx.need(ctx.tree, "the staged tree")
    result = check(tree, tree_expectations(ctx.config, ctx.spec), ctx.work / "verify")
    ctx.log.write(result.output)
    if not result.ok:
        shown = ", ".join(result.failures[:8]) or result.output.strip().splitlines()[-1]
        raise ImageError(f"the root tree failed {result.failed} check(s): {shown} (full log: {ctx.log.path})")
    if ctx.spec.emulated:
        _check_ruleset_foreign(ctx, tree)


def _check_ruleset_foreign(ctx: BuildContext, tree: Path) -> None:
    """The tree checks run the image's own nft on its ruleset; an image of another architecture runs
    its programs through qemu-user, which has no netfilter netlink: the tools tree's nft (the same
    Debian release, the host's architecture) checks it instead."""
    tools = ctx.need(ctx.tools, "the tools tree")
    etc = tree / "etc"
    try:
        tools.run(["nft", "-c", "-f", etc / "nftables.conf"], binds=[etc], log=ctx.log, what="nft -c (ruleset)")
    except ImageError as e:
        raise ImageError(f"the root tree failed its ruleset check: {e}") from None


def _esp(ctx: BuildContext) -> None:
    """The ESP depends only on the base (kernel, initramfs) and the command line: cached on both."""
    base, tools = ctx.need(ctx.base, "the base tree"), ctx.need(ctx.tools, "the tools tree")
    plat = ctx.spec.platform
    ctx.cmdline = cmdline = kernel_cmdline(ctx.ids, Slot.A, vm=ctx.spec.vm, serial=ctx.spec.serial)
    ids, sde, log = ctx.ids, ctx.sde, ctx.log

    entry = uki_entry(ctx.spec.name)

    efi = efi_binaries(ctx.opts.cache, ctx.archive, plat, log, ctx.need(ctx.archive_state, "the archive's state"))

    def make(tmp: Path) -> dict[str, object]:
        build_uki(tools, base.kernel, base.initrd, base.tree / "usr/lib/os-release", cmdline, tmp / "uki.efi",
                  sde, log, efi)
        build_esp(tools, tmp / "uki.efi", tmp / "esp.img", ids, ESP_SIZE, sde, log, entry, plat, efi)
        (tmp / "uki.efi").unlink()
        return {"cmdline": cmdline, "base": base.entry.key, "entry": entry}

    # the boot loader and stub: the tools tree's, or another architecture's unpacked (its path names its entry)
    key = content_key({"base": base.entry.key, "cmdline": cmdline, "serial": ids.esp_serial, "sde": sde,
                       "recipe": ESP_RECIPE, "entry": entry, "tools": tools.entry.key, "efi": efi.stub})
    ctx.esp = ctx.opts.cache.get_or_build(CacheKind.ESP, key, make).path / "esp.img"


def _rpi_boot(ctx: BuildContext) -> None:
    """The Pi firmware's boot partition, in the ESP's place: cached on the base and the command line."""
    base, tools, spec = ctx.need(ctx.base, "the base tree"), ctx.need(ctx.tools, "the tools tree"), ctx.spec
    ctx.cmdline = cmdline = kernel_cmdline(ctx.ids, Slot.A, vm=False, serial=spec.serial)
    state = ctx.need(ctx.archive_state, "the archive's state")
    firmware = unpacked_packages(ctx.opts.cache, ctx.archive, spec.platform, spec.boot.firmware_packages, ctx.log,
                                 state, components="main non-free-firmware")
    dtb_dir = base.tree / "usr/lib" / f"linux-image-{base.kernel_version}" / spec.boot.dtb_dir
    files = boot_files(spec.boot, firmware, base.kernel, base.initrd, dtb_dir, cmdline, spec.name)

    def make(tmp: Path) -> dict[str, object]:
        build_rpi_boot(tools, files, tmp / "esp.img", ctx.ids, ESP_SIZE, ctx.sde, ctx.log)
        return {"cmdline": cmdline, "base": base.entry.key, "files": sorted(files)}

    key = content_key({"base": base.entry.key, "cmdline": cmdline, "serial": ctx.ids.esp_serial, "sde": ctx.sde,
                       "recipe": RPI_BOOT_RECIPE, "board": spec.board, "firmware": str(firmware),
                       "files": sorted(files)})
    ctx.esp = ctx.opts.cache.get_or_build(CacheKind.ESP, key, make).path / "esp.img"


def _data_fs(ctx: BuildContext) -> None:
    """/var's content goes to the data partition; the root keeps an empty /var."""
    ctx.layout = layout()
    var = split_var(ctx.need(ctx.tree, "the staged tree"), ctx.work / "var", ctx.sde, ctx.log)
    build_data_fs(ctx.need(ctx.tools, "the tools tree"), var, ctx.work / "data.img", ctx.ids, ctx.layout.data_size,
                  ctx.sde, ctx.log)


def _root_fs(ctx: BuildContext) -> None:
    lay = ctx.need(ctx.layout, "the layout")
    out = ctx.work / "root.img"
    build_root_fs(ctx.need(ctx.tools, "the tools tree"), ctx.need(ctx.tree, "the staged tree"), out, ctx.ids,
                  ctx.sde, ctx.log)
    if out.stat().st_size > lay.slot_size:
        raise ImageError(f"the root file system ({out.stat().st_size // 2**20} MiB) does not fit a root slot "
                         f"({lay.slot_size // 2**20} MiB): leave packages out of system.packages")


def _disk(ctx: BuildContext) -> None:
    write_disk(ctx.need(ctx.tools, "the tools tree"), ctx.tmp["img"], ctx.need(ctx.esp, "the ESP"),
               ctx.work / "root.img", ctx.work / "data.img", ctx.need(ctx.layout, "the layout"), ctx.ids, ctx.log,
               ctx.spec.platform.root_type, ctx.spec.boot.part_type or ESP_TYPE)
    if not ctx.opts.keep_tree:
        remove_tree(ctx.need(ctx.tree, "the staged tree"))


def _outputs(ctx: BuildContext) -> None:
    compress(ctx.tmp["img"], ctx.tmp["zst"], ctx.log)
    bmap(ctx.tmp["img"], ctx.tmp["bmap"], ctx.log)
    for k in ("img", "zst", "bmap"):
        ctx.outputs[ctx.paths[k].name] = OutputFile(sha256(ctx.tmp[k]), ctx.tmp[k].stat().st_size)
    img = ctx.paths["img"].name
    ctx.outputs[img] = OutputFile(ctx.outputs[img].sha256, ctx.outputs[img].size, allocated(ctx.tmp["img"]))


def _finish(ctx: BuildContext) -> None:
    """The manifest, then every output renamed into place, the image last; the lock written."""
    base, lay = ctx.need(ctx.base, "the base tree"), ctx.need(ctx.layout, "the layout")
    ctx.manifest = BuildManifest.of_build(
        spec=ctx.spec, config_digest=ctx.config.digest(), profile=ctx.profile, base=base,
        tools_key=ctx.need(ctx.tools, "the tools tree").entry.key, suite=ctx.archive.suite, sde=ctx.sde,
        cmdline=ctx.cmdline,
        outputs=ctx.outputs, disk_size=lay.disk_size, t_start=ctx.t_start, stages=ctx.timings,
        tested=matching_record(ctx.out_dir, ctx.spec.name, ctx.profile.digest, base.packages))
    write_manifest(ctx.tmp["manifest"], ctx.manifest.to_json())
    for k in ("manifest", "bmap", "zst", "img"):
        os.replace(ctx.tmp[k], ctx.paths[k])
    if ctx.opts.lock_path and (ctx.lock is None or ctx.opts.update_lock):
        Lock(ctx.archive.suite, ctx.sde, base.packages).write(ctx.opts.lock_path)


STEPS = [
    BuildStep("tools tree", "tools", _tools),
    BuildStep("root tree (Debian trixie, mmdebstrap)", "base", _base),
    BuildStep("userspace dataplane (go build)", "netstack", _netstack, lambda ctx: ctx.spec.netstack),
    BuildStep("configuration onto the root tree", "stage", _stage),
    BuildStep("verify root tree (testinfra, chroot)", "verify_tree", _check_tree,
              lambda ctx: ctx.opts.check_tree is not None),
    BuildStep("ESP with unified kernel image", "esp", _esp, lambda ctx: ctx.spec.boot.kind == "uefi"),
    BuildStep("Pi boot partition (firmware, config.txt, kernel, device trees)", "esp", _rpi_boot,
              lambda ctx: ctx.spec.boot.kind == "rpi"),
    BuildStep("data partition (mkfs.ext4 -d /var)", "data_fs", _data_fs),
    BuildStep("root file system (mkfs.erofs)", "root_fs", _root_fs),
    BuildStep("GPT disk image", "disk", _disk),
    BuildStep("zstd, bmap, checksums", "outputs", _outputs),
    BuildStep("", "", _finish),
]


def sweep_leftovers(out_dir: Path, cache: Cache, name: str) -> None:
    """Remove temporaries of killed builds: hidden outputs and staged trees whose process is gone."""
    for p in out_dir.glob(f".{name}.*.tmp-*"):
        if not _alive(p.name.rsplit("-", 1)[-1]):
            p.unlink(missing_ok=True)
    work = cache.root / "work"
    if work.is_dir():
        for d in work.iterdir():
            if not _alive(d.name.rsplit("-", 1)[-1]):
                remove_tree(d)


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return int(pid) != 0
