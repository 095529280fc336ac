"""The base root tree: Debian trixie with the packages an ImageSpec names, built with mmdebstrap and
cached by content (package set, units, initramfs settings, archive snapshot or locked versions).

The base holds no profile configuration: it is shared by every profile with the same spec, and a
profile's configuration is laid over a hardlinked copy of it at each build (stage.py)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..render.renderer import SSH_HOST_KEY
from . import orphan_modules
from .bytecode import compile_bytecode
from .cache import Cache, CacheKind, Entry, content_key, dir_size
from .debian import PYTHON, Archive, dpkg_excludes, mmdebstrap_args
from .disk import DPKG_DB
from .lock import Lock
from .platform import Platform
from .run import BuildLog, ImageError, run
from .spec import INITRAMFS_VM, ImageSpec
from .tools import HOOK_TARGET, ToolsTree

BASE_RECIPE = 14  # bump when the hooks below change what a base tree contains


@dataclass(frozen=True)
class BaseTree:
    entry: Entry

    @property
    def tree(self) -> Path:
        return self.entry.path / "tree"

    @property
    def packages(self) -> dict[str, str]:
        return dict(self.entry.meta()["packages"])

    @property
    def kernel_version(self) -> str:
        return str(self.entry.meta()["kernel_version"])

    @property
    def kernel(self) -> Path:
        return self.tree / "boot" / f"vmlinuz-{self.kernel_version}"

    @property
    def initrd(self) -> Path:
        return self.tree / "boot" / f"initrd.img-{self.kernel_version}"


def base_key(spec: ImageSpec, archive: Archive, snapshot: str | None, lock: Lock | None, sde: int) -> str:
    return content_key(base_key_inputs(spec, archive, snapshot, lock, sde))


def base_key_inputs(spec: ImageSpec, archive: Archive, snapshot: str | None, lock: Lock | None,
                    sde: int) -> dict[str, object]:
    inputs: dict[str, object] = {
        "spec": spec.base_inputs(), "suite": archive.suite, "sources": archive.sources(),
        "snapshot": None if lock else snapshot, "lock": lock.packages if lock else None,
        "source_date_epoch": sde, "recipe": BASE_RECIPE,
    }
    if spec.emulated:
        inputs["emulated"] = EMULATED_RECIPE  # a tree built on this host's own architecture keeps its key
    return inputs


# What an emulated tree's maintainer scripts would run through qemu-user although its result does not
# depend on the CPU, they leave to the tools tree's native programs of the same version from the same
# suite. Byte-compiling Python's standard library and every python3-* package: a third of a foreign
# tree's build; 837 of 840 files came out byte-identical to the emulated ones, the other 3 differ only
# in how marshal shares constants. depmod, which reads every module: the kernel's postinst ran it
# over the whole set before the build prunes it and runs it again (17 s emulated, 2 s natively, for
# the pruned set of one foreign kernel); its 14 index files came out byte-identical. While packages
# are configured, the tree's own programs stand aside (py_compile.py an empty module, py3compile and
# depmod `true`). dpkg-deb, which decompresses each package dpkg unpacks: 0.6 s native, 3.0 s emulated
# for the cloud kernel's package; the tree came out byte-identical, so the key stayed.
EMULATED_RECIPE = 2  # bump when what the native programs make changes
PY_COMPILE = f"/usr/lib/python{PYTHON}/py_compile.py"
PY3COMPILE = "/usr/bin/py3compile"
# dpkg-deb, which decompresses every package, is the tools tree's of the same version, run natively
# from NATIVE_DIR with its own loader and libraries (and eatmydata's, which dpkg passes it to preload)
DPKG_DEB = "/usr/bin/dpkg-deb"
NATIVE_DIR = "/usr/lib/appliance-native"
DEPMOD = "/usr/sbin/depmod"
BYTECODE_DIRS = (f"usr/lib/python{PYTHON}", "usr/lib/python3/dist-packages")
# orphan_modules, run as a script by the tools tree's python3 (natively, whatever the tree's
# architecture) from where the hook puts it in the tree for the time it runs
ORPHANS_SCRIPT = Path(orphan_modules.__file__)
ORPHANS_IN_TREE = "/appliance-orphan-modules.py"


def _generator(spec: ImageSpec) -> str:
    """The program that writes the initramfs (the kernel's postinst runs it), by initramfs package."""
    return "/usr/sbin/mktirfs" if spec.initramfs == INITRAMFS_VM else "/usr/sbin/update-initramfs"


def _stand_aside(path: str, *, empty: bool = False) -> list[str]:
    """Hooks that move the tree's program at path aside (a local diversion, so its package installs
    it under another name) and leave `true`, or an empty file, in its place."""
    stand_in = f': > "$1{path}"' if empty else f'ln -sf /bin/true "$1{path}"'
    return [f'chroot "$1" dpkg-divert --quiet --local --rename --add {path}',
            *([f'mkdir -p "$1{os.path.dirname(path)}"'] if empty else []), stand_in]


def _restore(path: str) -> list[str]:
    """The reverse of _stand_aside: the stand-in goes, the program comes back."""
    return [f'rm -f "$1{path}"', f'chroot "$1" dpkg-divert --quiet --local --rename --remove {path}']


def _essential_hooks(spec: ImageSpec) -> list[str]:
    # build the initramfs once at the end instead of at every kernel/udev/... trigger
    hooks = _stand_aside(_generator(spec))
    if spec.emulated:
        hooks += [*_stand_aside(PY_COMPILE, empty=True), *_stand_aside(PY3COMPILE), *_stand_aside(DEPMOD)]
    return hooks


def _restore_emulated(spec: ImageSpec) -> list[str]:
    if not spec.emulated:
        return []
    # the native dpkg-deb only if it came (another dpkg in the tree: the tree's own never left)
    dpkg_deb = f'if [ -d "$1{NATIVE_DIR}" ]; then rm -rf "$1{NATIVE_DIR}" && {" && ".join(_restore(DPKG_DEB))}; fi'
    return [dpkg_deb, *_restore(PY_COMPILE), *_restore(PY3COMPILE), *_restore(DEPMOD)]


def _same_as_tools(package: str, otherwise: str) -> str:
    """Script for ToolsTree.hook: exit 3, saying what happens instead, unless the tools tree has the
    tree's version of package (its program then does the same work natively)."""
    t = HOOK_TARGET
    return (f"mine=$(dpkg-query -W -f '${{Version}}' {package}); "
            f"theirs=$(dpkg-query --admindir={t}/var/lib/dpkg -W -f '${{Version}}' {package}); "
            f'if [ "$mine" != "$theirs" ]; then echo "{package} $mine in the tools tree, $theirs in the tree: '
            f'{otherwise}" >&2; exit 3; fi; ')


def _native_dpkg_deb_hook(tools: ToolsTree) -> str:
    """An extract hook: before dpkg installs the first package, the tree's dpkg-deb stands aside for
    the tools tree's, copied with its loader and libraries to NATIVE_DIR, where it finds them
    (patchelf: interpreter, and RPATH, which covers its libraries' own), if it is the same version;
    else the tree's own stays (the same bytes, slower). dpkg is not installed yet: the version is
    the one each program reports."""
    t, d = HOOK_TARGET, NATIVE_DIR
    install = tools.hook(
        f"ld=$(patchelf --print-interpreter {DPKG_DEB}); mkdir {t}{d}; "
        f"cp -L {DPKG_DEB} \"$ld\" $(ldd {DPKG_DEB} | awk '$2 == \"=>\" {{print $3}}') "
        f"/usr/lib/*-linux-gnu/libeatmydata.so {t}{d}/; "
        f'patchelf --set-interpreter "{d}/${{ld##*/}}" --force-rpath --set-rpath {d} {t}{d}/dpkg-deb; '
        f"ln -s {d}/dpkg-deb {t}{DPKG_DEB}")
    mine = f"$(chroot {shlex.quote(str(tools.root))} {DPKG_DEB} --version | head -n 1)"
    theirs = f'$(chroot "$1" {DPKG_DEB} --version | head -n 1)'
    return (f'mine="{mine}"; theirs="{theirs}"; if [ -n "$mine" ] && [ "${{mine% (*}}" = "${{theirs% (*}}" ]; then '
            f'chroot "$1" dpkg-divert --quiet --local --rename --add {DPKG_DEB} && {install}; '
            f'else echo "tools tree: $mine; tree: $theirs: dpkg-deb runs emulated" >&2; fi')


def _depmod_hook(spec: ImageSpec, tools: ToolsTree) -> str:
    """depmod for each kernel of the tree: the tree's own on its own architecture, else the tools
    tree's, if it is the same kmod (else the tree's, emulated: the same bytes, slower)."""
    own = 'for v in $(ls "$1/usr/lib/modules"); do chroot "$1" depmod -a "$v"; done'
    if not spec.emulated:
        return own
    t = HOOK_TARGET
    native = tools.hook(_same_as_tools("kmod", "depmod runs emulated")
                        + f'for v in $(ls {t}/usr/lib/modules); do depmod -b {t} -a "$v"; done')
    return f'{native} || {{ [ $? -eq 3 ] && {own}; }}'


def _compile_bytecode(tools: ToolsTree, tree: Path, log: BuildLog) -> None:
    """What the emulated tree's maintainer scripts left out (see EMULATED_RECIPE)."""
    if not (tree / BYTECODE_DIRS[0]).is_dir():
        other = sorted(p.name for p in (tree / "usr/lib").glob("python3.*"))
        if other:
            raise ImageError(f"the root tree's Python is {', '.join(other)}, not python{PYTHON}: "
                             "debian.PYTHON names the suite's")
    compile_bytecode(tools, tree, list(BYTECODE_DIRS), log, "the tree's Python, natively")


# The base tree's own files: drop-ins and settings of Debian's packages, written here and copied
# into the tree by one hook (mmdebstrap's sync-in) before the initramfs is made, which reads some.
# path -> text; every file 0644 (a hook 0755) and every directory 0755, owned by root, dated SOURCE_DATE_EPOCH.
BaseFiles = dict[str, str]
# initramfs-tools runs only executable hooks
INITRAMFS_CLASSES_HOOK = "etc/initramfs-tools/hooks/appliance-modules"
EXECUTABLE_BASE_FILES = {INITRAMFS_CLASSES_HOOK}


def base_files(spec: ImageSpec, sde: int) -> BaseFiles:
    files: BaseFiles = {
        # one Ed25519 host key (every SSH client of the last decade speaks it): an RSA key takes seconds
        # to generate on a slow CPU, on the way to the first login; no `sshd -t` at every boot either
        # (the tree checks run it when the image is built). It is made at first boot on the data
        # partition (the root is read-only), and so outlives updates: known_hosts stays valid.
        "etc/systemd/system/ssh.service.d/10-appliance-hostkeys.conf":
            f'[Service]\nExecStartPre=\nExecStartPre=/bin/sh -c "test -e {SSH_HOST_KEY} || '
            f'{{ mkdir -p -m 0700 {SSH_HOST_KEY.rsplit("/", 1)[0]} && '
            f'ssh-keygen -q -t ed25519 -N \\"\\" -f {SSH_HOST_KEY}; }}"\n',
        # dpkg's database stays with the root it describes (stage.split_var)
        "etc/tmpfiles.d/appliance-dpkg.conf": f"L+ /var/lib/dpkg - - - - /{DPKG_DB}\n",
        # at first boot the data partition (the only one of its type) grows over the disk's free space,
        # then its ext4; not on the way to the tunnel, and never again (Debian's systemd-repart.service
        # would read the disk at every boot: masked)
        "etc/repart.d/50-data.conf": "[Partition]\nType=linux-generic\nLabel=data\n",
        f"etc/systemd/system/{GROW_DATA_UNIT}": (
            "[Unit]\nDescription=Grow the data partition over the disk (first boot)\n"
            "Documentation=man:systemd-repart(8) man:systemd-growfs(8)\n"
            f"ConditionPathExists=!{DATA_GROWN}\nRequiresMountsFor=/var\n\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            "ExecStart=/usr/bin/systemd-repart --dry-run=no\n"
            "ExecStart=/usr/lib/systemd/systemd-growfs /var\n"
            f"ExecStart=/usr/bin/install -D -m 0644 /dev/null {DATA_GROWN}\n\n"
            "[Install]\nWantedBy=multi-user.target\n"),
        # the image is up to date with its /usr: ConditionNeedsUpdate= units (sysusers, ldconfig, hwdb,
        # catalog) skip at boot, as on an installed system after its first boot; a package installed
        # on the device makes /usr newer and they run once again
        "etc/.updated": f"TIMESTAMP_NSEC={sde}000000000\n",
        "var/.updated": f"TIMESTAMP_NSEC={sde}000000000\n",
        # /dev's static nodes are made twice before udevd starts: gracefully (users sysusers has not
        # made yet are skipped), then again; here sysusers ran at build, so the second pass repeats
        # the first unless a package changed /usr (as sysusers itself)
        "etc/systemd/system/systemd-tmpfiles-setup-dev.service.d/10-appliance.conf":
            "[Unit]\nConditionNeedsUpdate=/etc\n",
    }
    if spec.modules_blacklist:
        files["etc/modprobe.d/appliance-lean.conf"] = (
            "# appliance: never loaded by alias (see ImageSpec.modules_blacklist)\n"
            + "".join(f"blacklist {m}\n" for m in spec.modules_blacklist))
    if spec.initramfs == INITRAMFS_VM:
        # AUTO_MODULES=no: detection would look at the build host's disks, not the device's
        files["etc/tiny-initramfs/tiny-initramfs.conf"] = (
            f"AUTO_MODULES=no\nINCLUDE_MODULES={','.join(spec.initrd_modules)}\nMICROCODE=no\nDEBUG=no\n")
    else:
        files["etc/initramfs-tools/modules"] = "".join(f"{m}\n" for m in spec.initrd_modules)
    if spec.initrd_classes:
        files[INITRAMFS_CLASSES_HOOK] = (
            "#!/bin/sh\n# appliance: the module classes of ImageSpec.initrd_classes (with MODULES=list)\n"
            'case "$1" in prereqs) exit 0;; esac\n. /usr/share/initramfs-tools/hook-functions\n'
            f"auto_add_modules {' '.join(spec.initrd_classes)}\n")
    return files


def write_base_files(files: BaseFiles, dest: Path) -> None:
    """The files below dest, as the sync-in hook copies them over the tree (directories included:
    each must have the mode the tree's own has, 0755, dest itself too)."""
    dest.mkdir(mode=0o755)
    os.chmod(dest, 0o755)
    for rel, text in files.items():
        path = dest / rel
        for parent in reversed(path.relative_to(dest).parents[:-1]):
            (dest / parent).mkdir(mode=0o755, exist_ok=True)
            os.chmod(dest / parent, 0o755)
        path.write_text(text)
        os.chmod(path, 0o755 if rel in EXECUTABLE_BASE_FILES else 0o644)


def _initramfs_hooks(spec: ImageSpec) -> list[str]:
    hooks = _restore(_generator(spec))
    if spec.initramfs == INITRAMFS_VM:
        return hooks + [
            'chroot "$1" update-tirfs',
            # mktirfs stamps its files with the time of the build and gzips them: repacked with
            # SOURCE_DATE_EPOCH, uncompressed (it is small; the kernel unpacks it without inflating)
            'for f in "$1"/boot/initrd.img-*; do chroot "$1" sh -ec \'d=$(mktemp -d); cd "$d"; '
            'zcat "/boot/$0" | cpio -id --quiet; find . -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +; '
            'find . ! -name . -print0 | LC_ALL=C sort -z | cpio --null -o --quiet --reproducible -R 0:0 -H newc '
            '> "/boot/$0"; cd /; rm -rf "$d"\' "${f##*/}"; done',
        ]
    modules = "list" if spec.initrd_classes else "most"  # list: the classes come from the hook
    hooks.append(f'sed -i "s/^MODULES=.*/MODULES={modules}/; s/^#*COMPRESS=.*/COMPRESS=zstd/" '
                 '"$1/etc/initramfs-tools/initramfs.conf"')
    return hooks + ['chroot "$1" update-initramfs -c -k all']


def _keep_modules_hook(names: tuple[str, ...]) -> str:
    """system.kernel_modules: each module and what it depends on (modprobe's own resolution) is put
    aside before the excluded subtrees go, and back after; a name the kernel does not have fails
    the build and says so (one built into the kernel needs nothing)."""
    return (
        'set -e; for v in $(ls "$1/usr/lib/modules"); do for m in ' + " ".join(shlex.quote(n) for n in names) + '; do '
        'out=$(chroot "$1" modprobe -S "$v" --show-depends "$m" 2>/dev/null) || true; '
        'case "$out" in builtin*) continue;; esac; '
        'deps=$(echo "$out" | awk \'$1 == "insmod" {print $2}\'); '
        'if [ -z "$deps" ]; then echo "kernel module $m (system.kernel_modules) is not a module of kernel $v" >&2; '
        'exit 1; fi; '
        'for f in $deps; do rel=${f#/usr}; rel=${rel#/lib/modules/}; '
        'mkdir -p "$1/kept-modules/$(dirname "$rel")"; cp -a "$1/usr/lib/modules/$rel" "$1/kept-modules/$rel"; '
        'done; done; done')


def _customize_hooks(spec: ImageSpec, files: Path, tools: ToolsTree) -> list[str]:
    hooks = _restore_emulated(spec)
    depmod = _depmod_hook(spec, tools)
    if spec.emulated and (spec.modules_keep or not spec.modules_exclude):
        hooks.append(depmod)  # the kernel's postinst did not run it: modprobe resolves by modules.dep
    if spec.modules_exclude:
        dirs = " ".join(f'"$1"/usr/lib/modules/*/kernel/{shlex.quote(d)}' for d in spec.modules_exclude)
        keep = [_keep_modules_hook(spec.modules_keep), f"rm -rf {dirs}",
                'if [ -d "$1/kept-modules" ]; then cp -a "$1/kept-modules/." "$1/usr/lib/modules/"; '
                'rm -rf "$1/kept-modules"; fi'] \
            if spec.modules_keep else [f"rm -rf {dirs}"]
        if spec.prune_orphan_modules:
            keep += [f"upload {shlex.quote(str(ORPHANS_SCRIPT))} {ORPHANS_IN_TREE}",
                     tools.hook(f"python3 {HOOK_TARGET}{ORPHANS_IN_TREE} {HOOK_TARGET}/usr/lib/modules; "
                                f"rm {HOOK_TARGET}{ORPHANS_IN_TREE}")]
        hooks += [*keep, depmod]
    hooks += [
        f"sync-in {shlex.quote(str(files))} /",  # base_files(), before the initramfs reads them
        'rm -f "$1/usr/lib/udev/hwdb.bin"',  # before the initramfs, which would copy it
        *_initramfs_hooks(spec),
        # host identity is made at first boot, never baked into an image that many devices share
        ': > "$1/etc/machine-id"',
        'rm -f "$1/var/lib/dbus/machine-id" "$1"/etc/ssh/ssh_host_*',
        # Debian's /etc/modules (empty) is linked into modules-load.d, so systemd-modules-load runs at
        # every boot to load nothing, and systemd-sysctl, then networkd, wait for it (~2 s under
        # emulation). Without the link it is skipped, until a module is listed in modules-load.d.
        'grep -qEv "^[[:space:]]*(#|$)" "$1/etc/modules" 2>/dev/null || rm -f "$1/etc/modules-load.d/modules.conf"',
        f'systemctl --root="$1" enable {shlex.join([*spec.enable_units, GROW_DATA_UNIT])}',
        f'systemctl --root="$1" disable {shlex.join(spec.disable_units)} 2>/dev/null || true',
        # first-boot catch-up jobs that have nothing to catch up on in a built image, but cost seconds
        # on a slow CPU: the linker cache and journal catalog are made at install, hwdb.bin is left
        # out on purpose (udev names devices without it)
        f'systemctl --root="$1" mask {shlex.join(MASKED_UNITS)}',
        # generators run before the first unit starts, each a process of its own
        'mkdir -p "$1/etc/systemd/system-generators" "$1/efi"',
        *(f'ln -sf /dev/null "$1/etc/systemd/system-generators/{g}"' for g in MASKED_GENERATORS),
        'ln -sf ../run/systemd/resolve/stub-resolv.conf "$1/etc/resolv.conf"',
        'rm -f "$1/etc/apt/preferences.d/appliance-lock"',
        # logs and caches of the install itself would only make trees differ
        'rm -rf "$1"/var/log/apt/* "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log',
        'rm -f "$1"/var/cache/ldconfig/aux-cache',
    ]
    return hooks


GROW_DATA_UNIT = "appliance-grow-data.service"
DATA_GROWN = "/var/lib/appliance/data-grown"
MASKED_UNITS = ["systemd-hwdb-update.service", "ldconfig.service", "systemd-journal-catalog-update.service",
                "systemd-update-done.service",
                # file systems and modules of desktops and debugging: FUSE, hugepages, POSIX message
                # queues, configfs, debugfs/tracefs, binfmt_misc, DRM, pstore; the kernel command
                # line's ip= (networkd is configured); each costs a process or a mount at boot
                "sys-fs-fuse-connections.mount", "modprobe@fuse.service", "dev-hugepages.mount", "dev-mqueue.mount",
                "sys-kernel-config.mount", "modprobe@configfs.service", "sys-kernel-debug.mount",
                "sys-kernel-tracing.mount", "proc-sys-fs-binfmt_misc.automount", "proc-sys-fs-binfmt_misc.mount",
                "systemd-binfmt.service", "modprobe@drm.service", "modprobe@efi_pstore.service",
                "systemd-pstore.service", "systemd-network-generator.service",
                # udev rules from credentials: the appliance passes none
                "systemd-udev-load-credentials.service",
                # systemd-boot's random seed and self-update would mount the ESP early at every
                # boot; the ESP is written only by image updates and by boot counting
                "systemd-boot-random-seed.service", "systemd-boot-update.service",
                # the data partition grows once, by appliance-grow-data.service
                "systemd-repart.service"]
# root is on the command line (fstab names only /var), there is no TPM, hibernation, SysV script, rc.local,
# offline update or kernel-command-line unit, and SSH listens on the network, not on vsock. (The ESP
# is mounted by the image's own efi.mount, for systemd-bless-boot only: gpt-auto's would be an
# automount, and autofs is not loaded.)
MASKED_GENERATORS = ["systemd-gpt-auto-generator", "systemd-hibernate-resume-generator", "systemd-rc-local-generator",
                     "systemd-ssh-generator", "systemd-system-update-generator", "systemd-sysv-generator",
                     "systemd-tpm2-generator", "systemd-run-generator"]

_MISSING = re.compile(r"Unable to locate package (\S+)|Package '?(\S+?)'? has no installation candidate")


def build_base(cache: Cache, tools: ToolsTree, archive: Archive, spec: ImageSpec, log: BuildLog, *,
               snapshot: str | None, lock: Lock | None, sde: int, rebuild: bool = False) -> BaseTree:
    if not spec.platform.buildable:
        raise ImageError(f"arch {spec.arch}: images cannot be built for it yet (issue #17)")
    if spec.emulated:
        _require_emulation(spec.platform)
    # the tools tree knows the host's package lists; another architecture's missing packages are
    # found by mmdebstrap itself (_MISSING below), later but with the same message
    missing = sorted(set(spec.packages) - tools.available_packages(spec.packages, log)) \
        if not spec.emulated else []
    if missing:
        raise ImageError(_missing_message(missing, spec))

    def make(tmp: Path) -> dict[str, object]:
        tree = tmp / "tree"
        args = [*mmdebstrap_args(cache.root / "debs", plat=spec.platform), f"--include={','.join(spec.packages)}",
                *[f"--dpkgopt={o}" for o in dpkg_excludes(spec.platform)],
                "--hook-dir=/usr/share/mmdebstrap/hooks/eatmydata"]
        if lock:
            prefs = tmp / "lock.pref"
            prefs.write_text(lock.apt_preferences())
            args.append(f'--setup-hook=mkdir -p "$1/etc/apt/preferences.d" && '
                        f'cp {shlex.quote(str(prefs))} "$1/etc/apt/preferences.d/appliance-lock"')
        files = tmp / "files"
        write_base_files(base_files(spec, sde), files)
        if spec.emulated:
            args.append(f"--extract-hook={_native_dpkg_deb_hook(tools)}")
        args += [f"--essential-hook={h}" for h in _essential_hooks(spec)]
        args += [f"--customize-hook={h}" for h in _customize_hooks(spec, files, tools)]
        try:
            # PYTHONDONTWRITEBYTECODE: maintainer scripts' Python writes no import caches (timestamped);
            # py3compile (or, for an emulated tree, _compile_bytecode afterwards) makes every .pyc,
            # hash-based under SOURCE_DATE_EPOCH: the same bytes each build
            run([*args, archive.suite, tree, *archive.sources()], log=log, what="mmdebstrap (root tree)",
                env={"SOURCE_DATE_EPOCH": str(sde), "PYTHONDONTWRITEBYTECODE": "1", **spec.emulator_env})
        except ImageError as e:
            gone = sorted({a or b for a, b in _MISSING.findall(str(e))})
            if gone:
                raise ImageError(_missing_message(gone, spec)) from None
            raise
        shutil.rmtree(files)
        if spec.emulated:
            _compile_bytecode(tools, tree, log)
        clamp_mtimes(tree, sde)
        packages = _installed(tree, log, spec.emulator_env)
        if lock:
            lock.check(packages)
        kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise ImageError(f"expected one kernel in the root tree, found {kernels or 'none'}")
        return {"packages": packages, "kernel_version": kernels[0], "size": dir_size(tree),
                "spec": spec.base_inputs(), "snapshot": snapshot}

    key = base_key(spec, archive, snapshot, lock, sde)
    return BaseTree(cache.get_or_build(CacheKind.BASE, key, make, rebuild=rebuild))


BINFMT = Path("/proc/sys/fs/binfmt_misc")


def _require_emulation(plat: Platform, binfmt: Path = BINFMT) -> None:
    """A tree of another architecture runs its maintainer scripts through qemu-user, which the kernel
    starts for that architecture's programs (binfmt_misc); with the F flag it works inside a chroot."""
    entry = binfmt / f"qemu-{plat.firmware_arch}"
    lines = entry.read_text().splitlines() if entry.exists() else []
    flags = next((line.removeprefix("flags:") for line in lines if line.startswith("flags:")), "")
    if lines[:1] != ["enabled"] or "F" not in flags:
        raise ImageError(f"arch {plat.arch}: this machine cannot run {plat.arch} programs ({entry} is missing, "
                         "disabled or without the F flag): install qemu-user-static and binfmt-support "
                         "(make setup does)")


def reusable_base(cache: Cache, spec: ImageSpec, archive: Archive, sde: int, snapshot: str | None,
                  window: float) -> BaseTree | None:
    """The cached base tree a build takes instead of the archive's current state's (Cache.reusable)."""
    entry = cache.reusable(CacheKind.BASE, lambda s: base_key(spec, archive, s, None, sde), snapshot, window)
    return BaseTree(entry) if entry else None


def newest_base(cache: Cache, spec: ImageSpec, archive: Archive, sde: int,
                max_age: float | None = None) -> BaseTree | None:
    """The newest complete base tree this recipe built for this spec from any state of the archive."""
    entry = cache.newest(CacheKind.BASE, lambda s: base_key(spec, archive, s, None, sde), max_age)
    return BaseTree(entry) if entry else None


def _missing_message(missing: list[str], spec: ImageSpec) -> str:
    own = [m for m in missing if m in spec.extra_packages]
    if own:
        return (f"unknown package{'s' if len(own) > 1 else ''} {', '.join(repr(m) for m in own)} in system.packages: "
                f"not in Debian {spec.arch} trixie main (check the name with `apt-cache search`)")
    return f"package{'s' if len(missing) > 1 else ''} {', '.join(missing)} not found in the archive"


def _installed(tree: Path, log: BuildLog, env: dict[str, str]) -> dict[str, str]:
    out = run(["chroot", tree, "dpkg-query", "-W", "-f", "${Package}\t${Version}\n"], log=log, env=env).stdout
    return dict(sorted(line.split("\t", 1) for line in out.splitlines() if "\t" in line))


def clamp_mtimes(root: Path, sde: int) -> None:
    """No file in the tree is newer than SOURCE_DATE_EPOCH, so equal content gives equal metadata."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            _clamp(os.path.join(dirpath, name), sde)
    _clamp(str(root), sde)


def _clamp(path: str, sde: int) -> None:
    st = os.lstat(path)
    if st.st_mtime > sde or st.st_atime != sde:
        os.utime(path, (sde, min(int(st.st_mtime), sde)), follow_symlinks=False)
