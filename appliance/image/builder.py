"""`appliance build`: tools tree -> base tree -> staged tree -> verified -> GPT image and its outputs.

Outputs are written under hidden temporary names in the output directory and renamed at the very
end, the image last: a failed or killed build leaves no NAME.img (and the next build sweeps up
what a killed one left behind)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..render.spec import ImageSpec
from ..render.tree import ConfigTree
from ..verify import verify_tree
from .assemble import ESP_SIZE, DiskIds, build_esp, build_root_fs, build_uki, kernel_cmdline, layout_for, write_disk
from .cache import Cache, content_key
from .debian import Archive
from .lock import Lock
from .netstack import IMAGE_PATH as NETSTACK_PATH
from .netstack import build_netstack
from .outputs import allocated, bmap, compress, sha256, write_manifest
from .rootfs import BaseTree, build_base, newest_base
from .run import BuildLog, ImageError, require_root
from .stage import remove_tree, stage_tree, tree_bytes
from .tools import ToolsTree, build_tools, tools_key

ESP_RECIPE = 2  # bump when the way the ESP is made changes
DEFAULT_SOURCE_DATE_EPOCH = 1735689600  # 2025-01-01: used when neither lock nor environment sets one

Step = Callable[[str], AbstractContextManager[None]]


@dataclass(frozen=True)
class BuildOptions:
    out_dir: Path = Path("images")
    cache: Cache = field(default_factory=Cache)
    no_cache: bool = False
    lock_path: Path | None = None  # with --lock: read it if it exists, else write it
    update_lock: bool = False
    verify: bool = True
    keep_tree: bool = False
    source_date_epoch: int | None = None


@dataclass
class BuildResult:
    image: Path
    manifest: dict[str, Any]
    timings: dict[str, float]
    kept_tree: Path | None = None


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    return {"img": out_dir / f"{name}.img", "zst": out_dir / f"{name}.img.zst",
            "bmap": out_dir / f"{name}.img.bmap", "manifest": out_dir / f"{name}.manifest.json"}


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


def build_image(spec: ImageSpec, config: ConfigTree, profile_info: dict[str, Any], opts: BuildOptions,
                step: Step, log: BuildLog) -> BuildResult:
    require_root("building an image")
    try:
        return _build(spec, config, profile_info, opts, step, log)
    except OSError as e:  # a full disk, a vanished directory: say which file, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        raise ImageError(f"{e.strerror or e}{where}") from None


def _build(spec: ImageSpec, config: ConfigTree, profile_info: dict[str, Any], opts: BuildOptions,
           step: Step, log: BuildLog) -> BuildResult:
    name = spec.name
    t_start = time.time()
    timings: dict[str, float] = {}


    def timed_step(title: str, key: str) -> AbstractContextManager[None]:
        return _timed(step, title, key, timings)

    out_dir = opts.out_dir.resolve()  # tools run chrooted: paths must be absolute
    out_dir.mkdir(parents=True, exist_ok=True)
    opts.cache.root.mkdir(parents=True, exist_ok=True)
    os.chmod(opts.cache.root, 0o700)  # staged trees inside hold private keys while a build runs
    sweep_leftovers(out_dir, opts.cache, name)
    archive = Archive.from_env()

    lock = None
    if opts.lock_path and opts.lock_path.exists() and not opts.update_lock:
        lock = Lock.read(opts.lock_path)
    sde = lock.source_date_epoch if lock else (
        opts.source_date_epoch or int(os.environ.get("SOURCE_DATE_EPOCH") or DEFAULT_SOURCE_DATE_EPOCH))

    with timed_step("tools tree", "tools"):
        tools = build_tools(opts.cache, archive, log, rebuild=opts.no_cache)
    with timed_step("root tree (Debian trixie, mmdebstrap)", "base"):
        base = _base(opts, tools, archive, spec, lock, sde, log)
    if spec.netstack:
        with timed_step("userspace dataplane (go build)", "netstack"):
            binary = build_netstack(opts.cache, archive, log)
        config.file(NETSTACK_PATH, binary.read_bytes(), mode=0o755)

    work = opts.cache.root.resolve() / "work" / f"{name}-{os.getpid()}"
    paths = output_paths(out_dir, name)
    tmp = {k: p.with_name(f".{p.name}.tmp-{os.getpid()}") for k, p in paths.items()}
    try:
        work.mkdir(parents=True, exist_ok=True)
        with timed_step("configuration onto the root tree", "stage"):
            tree = stage_tree(base, config, work / "tree", sde, log)
        if opts.verify:
            with timed_step("verify root tree (testinfra, chroot)", "verify_tree"):
                _verify(tree, config, spec, work, log)
        ids = DiskIds.for_name(name)
        cmdline = kernel_cmdline(ids, vm=spec.vm)
        with timed_step("ESP with unified kernel image", "esp"):
            esp = _esp(opts.cache, tools, base, ids, cmdline, sde, log)
        lay = layout_for(tree_bytes(tree))
        with timed_step("root file system (mkfs.ext4 -d)", "root_fs"):
            build_root_fs(tools, tree, work / "root.img", ids, lay.root_size, sde, log)
        with timed_step("GPT disk image", "disk"):
            write_disk(tools, tmp["img"], esp, work / "root.img", lay, ids, log)
        if not opts.keep_tree:
            remove_tree(tree)
        with timed_step("zstd, bmap, checksums", "outputs"):
            compress(tmp["img"], tmp["zst"], log)
            bmap(tmp["img"], tmp["bmap"], log)
            outputs = _outputs(tmp, paths)
        manifest = _manifest(spec, config, profile_info, base, tools, archive, sde, cmdline, outputs,
                             lay.disk_size, t_start, timings)
        write_manifest(tmp["manifest"], manifest)
        for k in ("manifest", "bmap", "zst", "img"):
            os.replace(tmp[k], paths[k])
        if opts.lock_path and (lock is None or opts.update_lock):
            Lock(archive.suite, sde, base.packages).write(opts.lock_path)
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        if not opts.keep_tree:
            remove_tree(work)
    timings["total"] = round(time.time() - t_start, 2)
    return BuildResult(paths["img"], manifest, timings, tree if opts.keep_tree else None)


@contextmanager
def _timed(step: Step, title: str, key: str, timings: dict[str, float]) -> Iterator[None]:
    t0 = time.monotonic()
    with step(title):
        yield
    timings[key] = round(time.monotonic() - t0, 2)


def _base(opts: BuildOptions, tools: ToolsTree, archive: Archive, spec: ImageSpec, lock: Lock | None, sde: int,
          log: BuildLog) -> BaseTree:
    snapshot = None if lock else archive.snapshot()
    if snapshot is None and lock is None:
        cached = newest_base(opts.cache, spec)
        if cached is not None and not opts.no_cache:
            log.write("archive unreachable: reusing the newest cached base tree\n")
            return cached
        raise ImageError("cannot reach the Debian archive to build the root tree (and nothing is cached)")
    return build_base(opts.cache, tools, archive, spec, log, snapshot=snapshot, lock=lock, sde=sde,
                      rebuild=opts.no_cache)


def _esp(cache: Cache, tools: ToolsTree, base: BaseTree, ids: DiskIds, cmdline: str, sde: int,
         log: BuildLog) -> Path:
    """The ESP depends only on the base (kernel, initramfs) and the command line: cached on both."""
    def make(tmp: Path) -> dict[str, object]:
        build_uki(tools, base.kernel, base.initrd, base.tree / "usr/lib/os-release", cmdline, tmp / "BOOTX64.EFI",
                  sde, log)
        build_esp(tools, tmp / "BOOTX64.EFI", tmp / "esp.img", ids, ESP_SIZE, sde, log)
        (tmp / "BOOTX64.EFI").unlink()
        return {"cmdline": cmdline, "base": base.entry.key}

    key = content_key({"base": base.entry.key, "cmdline": cmdline, "serial": ids.esp_serial, "sde": sde,
                       "recipe": ESP_RECIPE})
    return cache.get_or_build("esp", key, make).path / "esp.img"


def tree_expectations(config: ConfigTree, spec: ImageSpec) -> dict[str, Any]:
    """What the tree checks (verify/tree_suite.py) expect of a staged root tree."""
    return {
        "config": config.manifest(),
        "enabled_units": [*spec.enable_units, *spec.appliance_units],
        "packages": list(spec.packages),
        "secret_paths": [e.path for e in config if e.secret],
    }


def _verify(tree: Path, config: ConfigTree, spec: ImageSpec, work: Path, log: BuildLog) -> None:
    result = verify_tree(tree, tree_expectations(config, spec), work / "verify")
    log.write(result.output)
    if not result.ok:
        shown = ", ".join(result.failures[:8]) or result.output.strip().splitlines()[-1]
        raise ImageError(f"the root tree failed {result.failed} check(s): {shown} (full log: {log.path})")


def _outputs(tmp: dict[str, Path], paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    outputs: dict[str, dict[str, Any]] = {}
    for k in ("img", "zst", "bmap"):
        outputs[paths[k].name] = {"sha256": sha256(tmp[k]), "size": tmp[k].stat().st_size}
    outputs[paths["img"].name]["allocated"] = allocated(tmp["img"])
    return outputs


def _manifest(spec: ImageSpec, config: ConfigTree, profile_info: dict[str, Any], base: BaseTree, tools: ToolsTree,
              archive: Archive, sde: int, cmdline: str, outputs: dict[str, dict[str, Any]],
              disk_size: int, t_start: float, timings: dict[str, float]) -> dict[str, Any]:
    return {
        "manifest_version": 1,
        "appliance_version": __version__,
        "name": spec.name,
        "profile": profile_info,
        "config_digest": config.digest(),
        "source_date_epoch": sde,
        "suite": archive.suite,
        "snapshot": base.entry.meta().get("snapshot"),
        "base_key": base.entry.key,
        "tools_key": tools_key(archive),
        "kernel": {"package": spec.kernel_package, "version": base.kernel_version, "cmdline": cmdline},
        "packages": base.packages,
        "root_tree_bytes": base.entry.meta().get("size"),
        "disk_size": disk_size,
        "outputs": outputs,
        "build": {"started": int(t_start), "seconds": round(time.time() - t_start, 2), "stages": dict(timings)},
    }
