"""`appliance build`: a real Debian trixie image, checked without mounting anything: the partition
table with sfdisk, the ESP with mtools and `ukify inspect`, the root file system with dump.erofs and the
data partition with debugfs.

Builds share one cache ($APPLIANCE_TEST_CACHE, default ~/.cache/appliance-tests): the first run
builds the tools and root trees (about a minute), later builds reuse them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest

from appliance.image import Cache
from appliance.image.cache import CacheKind
from appliance.image.debian import PYTHON, REUSE_ENV, Archive
from appliance.image.disk import (
    DATA_TYPE,
    ESP_TYPE,
    DiskIds,
    Slot,
    kernel_cmdline,
    layout,
    system_files,
)
from appliance.image.outputs import sha256
from appliance.image.platform import platform
from appliance.image.rootfs import BaseTree
from appliance.image.run import NULL_LOG
from appliance.image.tested import write_record
from appliance.image.tools import ToolsTree, build_tools
from appliance.verify.vm import free_port
from conftest import PROFILES, REPO

pytestmark = [pytest.mark.root, pytest.mark.slow]

CACHE = Path(os.environ.get("APPLIANCE_TEST_CACHE") or Path.home() / ".cache" / "appliance-tests")


def appliance(*args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "APPLIANCE_CACHE": str(CACHE)}, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"appliance {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def build(profile: Path, out: Path, secrets: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return appliance("build", str(profile), "--out-dir", str(out), "--secrets", str(secrets), *extra, check=check)


def built_base(proc: subprocess.CompletedProcess[str]) -> BaseTree:
    """The base tree a `build --json` used (another build of the same spec may be newer)."""
    return BaseTree(Cache(CACHE).entry(CacheKind.BASE, json.loads(proc.stdout)["base_key"]))


@pytest.fixture(scope="session")
def tools() -> ToolsTree:
    return build_tools(Cache(CACHE), Archive.from_env(), NULL_LOG)


@pytest.fixture(scope="session")
def exit_node(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("exit-node")
    proc = build(PROFILES / "exit-node.yaml", d / "images", d / "secrets", "--json")
    return {"dir": d, "images": d / "images", "secrets": d / "secrets", "manifest": json.loads(proc.stdout),
            "stderr": proc.stderr}


def in_tools(tools: ToolsTree, cmd: list[str], binds: list[Path]) -> str:
    return tools.run(cmd, binds=binds, log=NULL_LOG)


def test_outputs_and_manifest(exit_node: dict[str, Any]) -> None:
    m, images = exit_node["manifest"], exit_node["images"]
    for name in ("exit-node.img", "exit-node.img.zst", "exit-node.img.bmap"):
        assert m["outputs"][name]["sha256"] == sha256(images / name), name
    assert (images / "exit-node.manifest.json").is_file()
    assert oct((images / "exit-node.img").stat().st_mode & 0o777) == "0o600"  # it holds the private key
    unpacked = subprocess.run(f"zstd -dc {images / 'exit-node.img.zst'} | sha256sum", shell=True,
                              capture_output=True, text=True, check=True).stdout.split()[0]
    assert unpacked == m["outputs"]["exit-node.img"]["sha256"]
    bmap = ElementTree.parse(images / "exit-node.img.bmap").getroot()
    assert bmap.tag == "bmap"
    assert int(bmap.findtext("ImageSize") or 0) == (images / "exit-node.img").stat().st_size
    assert 0 < int(bmap.findtext("MappedBlocksCount") or 0) < int(bmap.findtext("BlocksCount") or 0)
    assert m["packages"]["systemd"].startswith("257") and "linux-image-cloud-amd64" in m["packages"]
    assert m["profile"]["digest"] and len(m["config_digest"]) == 64
    for stage in ("tools", "base", "stage", "verify_tree", "esp", "data_fs", "root_fs", "disk", "outputs"):
        assert stage in m["build"]["stages"]
    assert not list(images.glob(".*tmp-*"))


def test_progress_per_stage(exit_node: dict[str, Any]) -> None:
    for title in ("tools tree", "root tree", "verify root tree", "ESP with unified kernel image",
                  "root file system", "GPT disk image"):
        assert f"✓ {title}" in exit_node["stderr"]


def test_partition_table(exit_node: dict[str, Any], tools: ToolsTree) -> None:
    img = exit_node["images"] / "exit-node.img"
    table = json.loads(in_tools(tools, ["sfdisk", "--json", str(img)], [img.parent]))["partitiontable"]
    ids, lay = DiskIds.for_name("exit-node"), layout()
    assert table["label"] == "gpt" and table["id"].lower() == ids.disk
    esp, root_a, root_b, data = table["partitions"]
    assert (esp["type"], esp["uuid"].lower(), esp["start"]) == (ESP_TYPE, ids.esp, 2048)
    assert esp["size"] * 512 == 128 * 2**20
    for slot, root in ((Slot.A, root_a), (Slot.B, root_b)):
        want = (platform("amd64").root_type, ids.slot_partition(slot), f"root-{slot}")
        assert (root["type"], root["uuid"].lower(), root["name"]) == want
        assert (root["start"] * 512, root["size"] * 512) == (lay.slot_offset(slot), lay.slot_size)
    assert (data["type"], data["uuid"].lower(), data["name"]) == (DATA_TYPE, ids.data_part, "data")
    assert (data["start"] + data["size"]) * 512 <= img.stat().st_size
    # slot B is empty in a fresh image: a hole, which the .bmap leaves out
    bmap = ElementTree.parse(exit_node["images"] / "exit-node.img.bmap").getroot()
    mapped = [tuple(int(x) * 4096 for x in (r.text or "").strip().split("-")) for r in bmap.iter("Range")]
    b_start, b_end = lay.slot_offset(Slot.B), lay.slot_offset(Slot.B) + lay.slot_size
    assert not [r for r in mapped if r[0] < b_end and r[-1] >= b_start], mapped


def test_esp_holds_the_loader_and_the_uki(exit_node: dict[str, Any], tools: ToolsTree, tmp_path: Path) -> None:
    """systemd-boot as the removable-media loader, its configuration (no menu, no editor), and the UKI
    under EFI/Linux with boot counting's +3 in its name."""
    img = exit_node["images"] / "exit-node.img"

    def esp(cmd: str) -> str:
        return in_tools(tools, ["sh", "-c", f"MTOOLS_SKIP_CHECK=1 {cmd}"], [img.parent, tmp_path])

    assert esp(f"mdir -b -i {img}@@1048576 ::/EFI/Linux").split() == ["::/EFI/Linux/exit-node-1-a+3.efi"]
    esp(f"mcopy -i {img}@@1048576 ::/EFI/BOOT/BOOTX64.EFI ::/loader/loader.conf ::/EFI/Linux/exit-node-1-a+3.efi "
        f"{tmp_path}/")
    assert b"systemd-boot" in (tmp_path / "BOOTX64.EFI").read_bytes()
    assert "editor no" in (tmp_path / "loader.conf").read_text().splitlines()
    (tmp_path / "exit-node-1-a+3.efi").rename(tmp_path / "BOOTX64.EFI")
    sections = in_tools(tools, ["ukify", "--json=short", "inspect", str(tmp_path / "BOOTX64.EFI")], [tmp_path])
    uki = json.loads(sections)
    cmdline = uki[".cmdline"]["text"].strip()
    assert cmdline == kernel_cmdline(DiskIds.for_name("exit-node"), Slot.A, vm=True)
    assert {"root=/dev/vda2", "rootfstype=erofs", "ro"} <= set(cmdline.split())
    assert uki[".uname"]["text"].strip() == exit_node["manifest"]["kernel"]["version"]
    assert uki[".linux"]["size"] > 5 * 2**20
    # board: qemu boots with tiny-initramfs: its init, the disk and NIC drivers, nothing else
    assert uki[".initrd"]["size"] < 1 * 2**20
    files = in_tools(tools, ["sh", "-c", f"cd {tmp_path} && objcopy -O binary --only-section=.initrd BOOTX64.EFI "
                                         "initrd && cpio -it --quiet < initrd"], [tmp_path]).split()
    assert {"init", "modules", "virtio_blk.ko", "virtio_net.ko", "i6300esb.ko", "watchdog.ko", "erofs.ko"} <= set(files)


def erofs(tools: ToolsTree, img: Path, *request: str) -> str:
    """dump.erofs on slot A's root file system."""
    offset = layout().slot_offset(Slot.A)
    return in_tools(tools, ["dump.erofs", f"--offset={offset}", *request, str(img)], [img.parent])


def debugfs(tools: ToolsTree, img: Path, request: str) -> str:
    """debugfs on the data partition."""
    return in_tools(tools, ["debugfs", "-R", request, f"{img}?offset={layout().data_offset}"], [img.parent])


def test_root_filesystem(exit_node: dict[str, Any], tools: ToolsTree) -> None:
    img = exit_node["images"] / "exit-node.img"
    assert "0xE0F5E1E2" in erofs(tools, img, "-s")  # erofs: read-only by construction
    key = erofs(tools, img, "--path=/etc/credstore/network.wireguard.private.wg0")
    assert "Access: 0600/" in key and "Uid: 0   Gid: 0" in key
    assert "Access: 0700/" in erofs(tools, img, "--path=/etc/credstore")
    nft = erofs(tools, img, "--cat", "--path=/etc/nftables.conf")
    assert 'iifname "wg0" oifname != "wg0" counter masquerade' in nft
    etc_ssh = erofs(tools, img, "--ls", "--path=/etc/ssh")
    assert "ssh_host_" not in etc_ssh and "sshd_config.d" in etc_ssh
    assert erofs(tools, img, "--cat", "--path=/etc/machine-id").strip() == DiskIds.for_name("exit-node").machine_id
    wants = erofs(tools, img, "--ls", "--path=/etc/systemd/system/multi-user.target.wants")
    assert "systemd-networkd.service" in wants and "ssh.service" in wants
    assert "nftables.service" in erofs(tools, img, "--ls", "--path=/etc/systemd/system/sysinit.target.wants")
    assert "vmlinuz" not in erofs(tools, img, "--ls", "--path=/boot")
    assert erofs(tools, img, "--cat", "--path=/etc/hostname").strip().endswith("exit-node")
    # /var is only a mount point in the root (and /var/tmp, for PrivateTmp=disconnected before it is
    # mounted); dpkg's database stays with the root it describes
    assert names(erofs(tools, img, "--ls", "--path=/var")) == [".", "..", "tmp"]
    assert names(erofs(tools, img, "--ls", "--path=/var/tmp")) == [".", ".."]
    assert "status" in names(erofs(tools, img, "--ls", "--path=/usr/lib/appliance/dpkg"))


def names(listing: str) -> list[str]:
    """The file names in dump.erofs --ls output (after its NID TYPE FILENAME header)."""
    rows = listing.split("FILENAME", 1)[1].splitlines()
    return [row.split()[2] for row in rows if len(row.split()) == 3]


def test_data_partition(exit_node: dict[str, Any], tools: ToolsTree) -> None:
    """The data partition holds the tree's /var (mounted there), without dpkg's database."""
    img = exit_node["images"] / "exit-node.img"
    assert f"Filesystem UUID:          {DiskIds.for_name('exit-node').data_fs}" in debugfs(tools, img, "stats")
    lib = debugfs(tools, img, "ls -l /lib")
    assert " systemd" in lib and " dpkg" not in lib
    assert "ssh" not in debugfs(tools, img, "ls /lib").split()  # host keys are made on the device


def test_private_key_only_in_root_only_file(exit_node: dict[str, Any]) -> None:
    private = (exit_node["secrets"] / "exit-node" / "private.key").read_text().strip()
    images = exit_node["images"]
    for f in ("exit-node.manifest.json", "exit-node.build.log", "exit-node.img.bmap"):
        assert private not in (images / f).read_text(), f
    assert private not in exit_node["stderr"]


def test_rebuild_is_bit_identical_and_config_only_rebuild_is_quick(exit_node: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    first = exit_node["manifest"]
    with watch_modes(exit_node["images"]) as seen:
        again = json.loads(build(PROFILES / "exit-node.yaml", exit_node["images"], exit_node["secrets"],
                                 "--json").stdout)
    assert again["outputs"]["exit-node.img"]["sha256"] == first["outputs"]["exit-node.img"]["sha256"]
    # the image and its .zst hold the private key: no one else could read them at any moment of the build
    assert any(".exit-node.img.tmp-" in name for name in seen) and any(".img.zst.tmp-" in name for name in seen)
    assert {name: mode for name, mode in seen.items() if ".img." in name and ".bmap" not in name
            and mode & 0o077}.keys() == set(), seen
    # a configuration-only change (a new peer) reuses the base tree and gives a different image
    text = (PROFILES / "exit-node.yaml").read_text().replace(
        "dataplane:", "    - {name: tablet, public_key: K96DZC4rXOjZrtOcKzO5/XmhczSwYZHPDHk7snb5xkw=, "
        "allowed_ips: [100.64.0.4/32]}\ndataplane:")
    changed = tmp_path / "exit-node.yaml"
    changed.write_text(text)
    m = json.loads(build(changed, exit_node["images"], exit_node["secrets"], "--json").stdout)
    assert m["base_key"] == first["base_key"]
    assert m["outputs"]["exit-node.img"]["sha256"] != first["outputs"]["exit-node.img"]["sha256"]
    stages = m["build"]["stages"]
    outside_assembly = sum(v for k, v in stages.items() if k not in ("esp", "data_fs", "root_fs", "disk", "outputs"))
    assert outside_assembly <= 5.0, stages


@contextlib.contextmanager
def watch_modes(directory: Path) -> Iterator[dict[str, int]]:
    """The most permissive mode each file in directory had while the block ran (polled every 2 ms)."""
    seen: dict[str, int] = {}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for entry in os.scandir(directory):
                with contextlib.suppress(OSError):
                    seen[entry.name] = seen.get(entry.name, 0) | entry.stat().st_mode & 0o777
            time.sleep(0.002)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


def test_unknown_package_fails_cleanly(tmp_path: Path) -> None:
    text = (PROFILES / "exit-node.yaml").read_text().replace("  timezone: UTC", "  timezone: UTC\n  packages: "
                                                               "[tcpdump, no-such-package-xyz]")
    profile = tmp_path / "exit-node.yaml"
    profile.write_text(text)
    proc = build(profile, tmp_path / "images", tmp_path / "secrets", check=False)
    assert proc.returncode == 1
    assert "unknown package 'no-such-package-xyz' in system.packages" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "images" / "exit-node.img").exists()


def test_killed_build_leaves_no_image(exit_node: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "images"
    cmd = [sys.executable, "-m", "appliance", "build", str(PROFILES / "exit-node.yaml"), "--out-dir", str(out),
           "--secrets", str(exit_node["secrets"])]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "APPLIANCE_CACHE": str(CACHE)})
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + 300
    while "▸ zstd" not in seen and time.monotonic() < deadline:  # the image file is being written now
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "▸ zstd" in seen, seen
    assert not (out / "exit-node.img").exists()
    assert list(out.glob(".exit-node.img.tmp-*")), "expected the killed build's temporary image"
    build(PROFILES / "exit-node.yaml", out, exit_node["secrets"])
    assert (out / "exit-node.img").exists() and not list(out.glob(".exit-node.*tmp-*"))


def test_full_disk_fails_cleanly(exit_node: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "small"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(out)], check=True)
    try:
        proc = build(PROFILES / "exit-node.yaml", out, exit_node["secrets"], check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "No space left on device" in proc.stderr
        assert not (out / "exit-node.img").exists() and not list(out.glob(".exit-node.*tmp-*"))
    finally:
        subprocess.run(["umount", str(out)], check=True)


NETWORKD_IN_TREE = """
set -e
mount -t tmpfs tmpfs "$1/run" && mkdir -p "$1/run/systemd"
mount -t proc proc "$1/proc" && mount -t sysfs sysfs "$1/sys"
chroot "$1" sh -c 'set -e; ip link set lo up
udevadm verify --no-style /etc/udev/rules.d/90-appliance-offload.rules
systemd-analyze verify --man=no /etc/systemd/system/appliance-*.service
# the keys as PID1 hands them to networkd (ImportCredential=): readable by its user only
mkdir -p /run/creds && cp /etc/credstore/network.* /run/creds/ && chown -R systemd-network /run/creds
SYSTEMD_LOG_LEVEL=debug SYSTEMD_LOG_TARGET=console CREDENTIALS_DIRECTORY=/run/creds \\
  timeout 3 /usr/lib/systemd/systemd-networkd 2>&1 || true'
"""


def networkd_in_tree(tree: Path) -> list[str]:
    """The image's own systemd-networkd (trixie) and udevadm on the staged tree, in a private network
    and mount namespace: what they say about the rendered files."""
    res = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c",
                          NETWORKD_IN_TREE, "_", str(tree)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout
    return [ln for ln in res.stdout.splitlines() if "/etc/systemd/network/" in ln]


def test_image_tools_accept_rendered_files(exit_node: dict[str, Any], tmp_path: Path) -> None:
    """The image's own systemd (257, newer than the host's) on the rendered files: networkd's parser,
    udev rules (udevadm verify). Run from a kept staged tree."""
    out = tmp_path / "images"
    proc = build(PROFILES / "exit-node.yaml", out, exit_node["secrets"], "--keep-tree")
    tree = Path(next(line.split("kept root tree: ", 1)[1].split(" (")[0] for line in proc.stderr.splitlines()
                     if "kept root tree: " in line))
    try:
        lines = networkd_in_tree(tree)
        loaded = {ln.split(":")[0] for ln in lines if ln.endswith("Successfully loaded.")}
        assert loaded == {"/etc/systemd/network/10-uplink.network", "/etc/systemd/network/30-wg0.network",
                          "/etc/systemd/network/30-wg0.netdev"}, lines
        complaints = [ln for ln in lines if not ln.endswith("Successfully loaded.")]
        assert complaints == []
        # the same check on a planted mistake: it must speak up
        uplink = tree / "etc/systemd/network/10-uplink.network"
        uplink.write_text(uplink.read_text() + "Bogus=1\n")
        assert any("Unknown key 'Bogus'" in ln for ln in networkd_in_tree(tree))
    finally:
        subprocess.run(["rm", "-rf", str(tree.parent)], check=True)


def test_lock_rebuilds_the_same_image_from_a_fresh_root_tree(exit_node: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--lock writes the versions; a locked build makes a new base tree (pinned by apt preferences)
    from scratch, and because the versions are the same, the image is bit-identical."""
    # the versions to lock must be the archive's current ones, not those of an older tree the suite reuses
    monkeypatch.setenv(REUSE_ENV, "0")
    profile = tmp_path / "exit-node.yaml"
    profile.write_text((PROFILES / "exit-node.yaml").read_text())
    first = json.loads(build(profile, tmp_path / "images", exit_node["secrets"], "--lock", "--json").stdout)
    lock = json.loads((tmp_path / "exit-node.lock").read_text())
    assert lock["packages"] == first["packages"] and lock["source_date_epoch"] == first["source_date_epoch"]
    second = json.loads(build(profile, tmp_path / "images", exit_node["secrets"], "--lock", "--json").stdout)
    assert second["base_key"] != first["base_key"]  # built anew, pinned
    assert second["packages"] == first["packages"]
    assert second["outputs"]["exit-node.img"]["sha256"] == first["outputs"]["exit-node.img"]["sha256"]


def test_tree_verification_catches_a_broken_tree(exit_node: dict[str, Any], tmp_path: Path) -> None:
    from appliance.image import image_spec
    from appliance.image.builder import tree_expectations
    from appliance.profile import load_profile
    from appliance.render import render
    from appliance.secrets import SecretStore
    from appliance.verify import verify_tree

    proc = build(PROFILES / "exit-node.yaml", tmp_path / "images", exit_node["secrets"], "--keep-tree")
    tree = Path(next(line.split("kept root tree: ", 1)[1].split(" (")[0] for line in proc.stderr.splitlines()
                     if "kept root tree: " in line))
    try:
        p = load_profile(PROFILES / "exit-node.yaml").profile
        config = render(p, SecretStore(exit_node["secrets"]).appliance_keys(p.name, ["phone"]))
        for path, text in system_files(DiskIds.for_name(p.name)).items():  # as the build's own stage adds them
            config.file(path, text)
        expect = {**tree_expectations(config, image_spec(p)), "kernel_modules": ["wireguard"]}
        assert verify_tree(tree, expect, tmp_path / "v1").ok
        os.chmod(tree / "etc/credstore/network.wireguard.private.wg0", 0o644)
        os.chmod(tree / "etc/sysctl.d/90-appliance.conf", 0o600)
        (tree / "etc/nftables.conf").write_text("flush ruleset\n")
        subprocess.run(["chroot", str(tree), "systemctl", "disable", "--quiet", "ssh.service"], check=True)
        link = next(r["path"] for r in expect["config"] if r["kind"] == "symlink")
        (tree / link).unlink()
        (tree / link).symlink_to("/dev/null")
        (tree / "etc/machine-id").unlink()  # replaced, not written through a hardlink into the cache
        (tree / "etc/machine-id").write_text("0" * 32 + "\n")
        (tree / "boot/vmlinuz-planted").write_text("")
        result = verify_tree(tree, {**expect, "kernel_modules": ["wireguard", "no_such_module"]}, tmp_path / "v2")
        failed = set(result.failures)
        assert {"test_key_files_root_only", "test_rendered_files_owner_mode_kind", "test_rendered_file_contents",
                "test_units_enabled", "test_symlink_targets", "test_host_identity",
                "test_kernel_only_in_the_uki"} <= failed, result.output
        assert "not in the image: ['no_such_module']" in result.output, result.output
        assert any(f.startswith("test_kernel_modules_the_profile_keeps") for f in failed), result.output
    finally:
        subprocess.run(["rm", "-rf", str(tree.parent)], check=True)


def test_image_tools_accept_edge_values(exit_node: dict[str, Any], tmp_path: Path) -> None:
    """udevadm verify and networkd 257 from the image's root tree accept what the hostile-string
    test's edge values render (test_hostile_strings.EDGE_VALUES)."""
    from test_hostile_strings import edge_trees

    # the exit node's own base (another build of the same spec, e.g. without a lock, may be newer)
    base = BaseTree(Cache(CACHE).entry(CacheKind.BASE, exit_node["manifest"]["base_key"]))
    for what, root in edge_trees(tmp_path / "edge"):
        tree = tmp_path / "tree"
        subprocess.run(["cp", "-al", str(base.tree), str(tree)], check=True)
        try:  # the rendered files replace (not overwrite) the cached base's hardlinks
            subprocess.run(["cp", "-a", "--remove-destination", f"{root}/.", str(tree)], check=True)
            messages = networkd_in_tree(tree)
            assert not [m for m in messages if "error" in m.lower() or "Failed to parse" in m], (what, messages)
        finally:
            subprocess.run(["rm", "-rf", str(tree)], check=True)


def test_update_sends_only_a_tested_image_of_a_known_commit(exit_node: dict[str, Any]) -> None:
    """The gate before anything goes to a device: without a passing `appliance test` of this profile,
    code and packages the update is refused; with one it goes on (here to a port nobody answers: 4)."""
    m = exit_node["manifest"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert m["profile"]["source"]["commit"] == head and m["tested"] is None
    args = ["update", str(PROFILES / "exit-node.yaml"), "--host", f"127.0.0.1:{free_port()}", "--timeout", "5",
            "--out-dir", str(exit_node["images"]), "--secrets", str(exit_node["secrets"])]
    refused = appliance(*args, check=False)
    assert refused.returncode == 2 and "has not passed `appliance test`" in refused.stderr, refused.stderr[-2000:]
    write_record(exit_node["images"], "exit-node", m["profile"]["digest"], m["packages"], {"passed": 1})
    gone = appliance(*args, check=False)
    assert gone.returncode == 4, gone.stderr[-2000:]
    rebuilt = json.loads((exit_node["images"] / "exit-node.manifest.json").read_text())
    assert rebuilt["tested"]["result"] == {"passed": 1}
    untested = appliance(*args, "--untested", check=False)  # the record aside: --untested also goes on
    assert untested.returncode == 4, untested.stderr[-2000:]


def test_fleet_update_stops_after_an_unreachable_canary(exit_node: dict[str, Any], tmp_path: Path) -> None:
    """The fleet rollout's wiring on real builds: the canary does not answer (4), so the second
    device is never started; without --untested nothing is built for nothing: refused first (2)."""
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    text = (PROFILES / "exit-node.yaml").read_text()
    (fleet / "exit-node.yaml").write_text(text)
    for a, b in (("name: exit-node", "name: exit-node-2"), ("100.64.0.1/32", "100.64.1.1/32"),
                 ('"fd7a:115c:a1e0::1/128"', '"fd7a:115c:a1e1::1/128"'), ("exit.example", "exit2.example")):
        text = text.replace(a, b)
    (fleet / "exit-node-2.yaml").write_text(text)
    inventory = fleet / "inventory.yaml"
    inventory.write_text(f"canary: exit-node\ndevices:\n  exit-node-2: 127.0.0.1:{free_port()}\n"
                         f"  exit-node: 127.0.0.1:{free_port()}\n")
    args = ["fleet", "update", str(fleet), "--inventory", str(inventory), "--timeout", "5", "--json",
            "--out-dir", str(tmp_path / "images"), "--secrets", str(exit_node["secrets"])]
    refused = appliance(*args, check=False)
    assert refused.returncode == 2 and "not tested in this checkout: exit-node, exit-node-2" in refused.stderr, \
        refused.stderr[-2000:]
    ran = appliance(*args, "--untested", check=False)
    assert ran.returncode == 4, ran.stderr[-2000:]
    states = [(d["name"], d["state"]) for d in json.loads(ran.stdout)["devices"]]
    assert states == [("exit-node", "unreachable"), ("exit-node-2", "not started")], states


def test_kernel_modules_brings_back_what_a_hardware_image_leaves_out(tmp_path: Path) -> None:
    """A generic (hardware) image leaves out sound, graphics, Wi-Fi and the like; a module named in
    system.kernel_modules stays, with what it depends on, and the build's tree check found it
    (test_kernel_modules_the_profile_keeps). A name the kernel does not have stops the build's hook
    with a message naming it."""
    from appliance.image.rootfs import _keep_modules_hook

    text = (PROFILES / "exit-node.yaml").read_text().replace("  board: qemu ", "  board: generic ").replace(
        "  timezone: UTC", "  timezone: UTC\n  kernel_modules: [iwlwifi]")
    profile = tmp_path / "exit-node.yaml"
    profile.write_text(text)
    base = built_base(build(profile, tmp_path / "images", tmp_path / "secrets", "--json"))
    kernel = base.tree / "usr/lib/modules" / base.kernel_version / "kernel"
    assert list((kernel / "drivers/net/wireless/intel/iwlwifi").glob("iwlwifi.ko*"))
    assert list((kernel / "net/wireless").glob("cfg80211.ko*"))  # its dependency
    # the control: the rest of its kind, and other kinds, are gone; wired NICs stay
    assert not (kernel / "drivers/net/wireless/realtek").exists() and not (kernel / "sound").exists()
    assert not (kernel / "drivers/gpu").exists() and list((kernel / "drivers/net/ethernet/intel/e1000e").glob("*.ko*"))
    assert "iwlwifi.ko" in (base.tree / "usr/lib/modules" / base.kernel_version / "modules.dep").read_text()
    # storage networks are left out, local storage controllers stay; a module that lost what it
    # depends on went too (orphan_modules), its neighbour with all it needs stayed
    assert not (kernel / "drivers/scsi/lpfc").exists() and list((kernel / "drivers/scsi/mpt3sas").glob("*.ko*"))
    assert not list(kernel.glob("drivers/hid/i2c-hid/i2c-hid.ko*")) and list(kernel.glob("drivers/hid/usbhid/*.ko*"))
    assert not list(kernel.glob("net/mac80211/*.ko*"))  # iwlwifi does not depend on it: not kept
    # its initramfs finds disks (initramfs-tools' storage classes) but holds no NIC driver: those load
    # from the root (the control: e1000e is in the root, above)
    listing = subprocess.run(["chroot", str(base.tree), "lsinitramfs", f"/boot/{base.initrd.name}"],
                             capture_output=True, text=True, check=True).stdout
    names = {Path(line).name.split(".ko")[0] for line in listing.split() if ".ko" in line}
    assert {"ahci", "nvme", "sd_mod", "usb-storage", "xhci-pci", "virtio_blk", "erofs"} <= names, sorted(names)
    assert not names & {"e1000e", "r8169", "igc", "virtio_net", "lpfc", "qla2xxx", "qedf"}, sorted(names)
    proc = subprocess.run(["sh", "-c", _keep_modules_hook(("no_such_module",)), "hook", str(base.tree)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "kernel module no_such_module (system.kernel_modules) is not a module of kernel" in proc.stderr
    assert not (base.tree / "kept-modules").exists()


# Runs in the tools tree's python (the suite's version): the hash and cache names are that version's
BYTECODE_CHECK = r'''
import importlib.util, marshal, os, sys
tree, dirs = sys.argv[1], sys.argv[2:]
count, bad = 0, []
for d in dirs:
    for root, _, files in os.walk(os.path.join(tree, d)):
        for name in sorted(f for f in files if f.endswith(".py")):
            src = os.path.join(root, name)
            path = "/" + os.path.relpath(src, tree)
            count += 1
            try:
                data = open(importlib.util.cache_from_source(src), "rb").read()
            except FileNotFoundError:
                bad.append(f"{path}: no bytecode")
                continue
            source_hash = importlib.util.source_hash(open(src, "rb").read())
            if data[:4] != importlib.util.MAGIC_NUMBER or data[4:8] != b"\3\0\0\0" or data[8:16] != source_hash:
                bad.append(f"{path}: not its source's hash-checked bytecode")
            elif marshal.loads(data[16:]).co_filename != path:
                bad.append(f"{path}: names {marshal.loads(data[16:]).co_filename}")
print(count)
print("\n".join(bad))
'''


def check_bytecode(tools: ToolsTree, tree: Path, dirs: tuple[str, ...]) -> tuple[int, list[str]]:
    out = in_tools(tools, [f"python{PYTHON}", "-c", BYTECODE_CHECK, str(tree), *dirs], binds=[tree]).splitlines()
    return int(out[0]), [line for line in out[1:] if line]


def check_module_index(modules: Path, dep: str) -> list[str]:
    """What a modules.dep text gets wrong about the module files under modules/kernel."""
    files = {p.relative_to(modules).as_posix() for p in (modules / "kernel").rglob("*.ko*")}
    indexed = {line.split(":", 1)[0] for line in dep.splitlines() if line}
    return ([f"not indexed: {f}" for f in sorted(files - indexed)]
            + [f"indexed, not in the tree: {f}" for f in sorted(indexed - files)])


def test_emulated_tree_has_the_bytecode_of_every_python_file(tools: ToolsTree, tmp_path: Path) -> None:
    """An arm64 tree's Python is byte-compiled natively after its packages are configured (rootfs.py,
    EMULATED_RECIPE): every .py file in the standard library and dist-packages has hash-checked
    bytecode of its own source, naming the file as the image has it. Its kernel modules' index is
    made natively too, after the pruning, and names exactly the modules left."""
    from appliance.image.rootfs import BYTECODE_DIRS

    profile = PROFILES / "arm64-exit-node.yaml"
    base = built_base(build(profile, tmp_path / "images", tmp_path / "secrets", "--json"))
    count, bad = check_bytecode(tools, base.tree, BYTECODE_DIRS)
    assert count > 500 and not bad, bad[:20]
    # Debian's compilers are back where their packages put them, no diversion left
    diversions = subprocess.run(["chroot", str(base.tree), "dpkg-divert", "--list"], capture_output=True, text=True,
                                check=True).stdout
    assert "py_compile" not in diversions and "py3compile" not in diversions, diversions
    assert "def compile(" in (base.tree / BYTECODE_DIRS[0] / "py_compile.py").read_text()
    # depmod too; its index (written by the tools tree's) names exactly the modules the pruned tree has
    assert "depmod" not in diversions and os.readlink(base.tree / "usr/sbin/depmod") == "../bin/kmod"
    assert "dpkg-deb" not in diversions and not (base.tree / "usr/lib/appliance-native").exists()
    modules = base.tree / "usr/lib/modules" / base.kernel_version
    assert check_module_index(modules, (modules / "modules.dep").read_text()) == []
    lines = (modules / "modules.dep").read_text().splitlines(keepends=True)
    planted = "".join(lines[1:]) + "kernel/sound/gone.ko.xz:\n"  # the control: one left out, one not there
    assert check_module_index(modules, planted) == [f"not indexed: {lines[0].split(':')[0]}",
                                                    "indexed, not in the tree: kernel/sound/gone.ko.xz"]
    # the control: a copy of one package with a changed source and a missing cache is caught
    copy = tmp_path / "copy"
    shutil.copytree(base.tree / BYTECODE_DIRS[0] / "json", copy / "lib/json")
    with open(copy / "lib/json/decoder.py", "a") as f:
        f.write("# changed\n")
    next((copy / "lib/json/__pycache__").glob("encoder.*.pyc")).unlink()
    count, bad = check_bytecode(tools, copy, ("lib",))
    assert "/lib/json/decoder.py: not its source's hash-checked bytecode" in bad
    assert "/lib/json/encoder.py: no bytecode" in bad
    # and a file that moved no longer has the name its bytecode gives it
    assert f"/lib/json/__init__.py: names /usr/lib/python{PYTHON}/json/__init__.py" in bad


def test_depmod_of_an_emulated_tree_falls_back_to_the_trees_own(exit_node: dict[str, Any], tools: ToolsTree,
                                                               tmp_path: Path) -> None:
    """The tools tree's depmod indexes an emulated tree's modules only if it is the same kmod as the
    tree's; else the tree's own depmod runs (emulated, for a foreign tree). Run against a tree
    overlaid on the tools tree, with one module, so that both depmods are at hand and native."""
    from appliance.image import image_spec
    from appliance.image.rootfs import _depmod_hook
    from appliance.profile import load_profile

    arm64 = image_spec(load_profile(PROFILES / "arm64-exit-node.yaml").profile)
    base = BaseTree(Cache(CACHE).entry(CacheKind.BASE, exit_node["manifest"]["base_key"]))
    module = next((base.tree / "usr/lib/modules" / base.kernel_version / "kernel/drivers/net/wireguard").glob("*.ko*"))
    hook = _depmod_hook(arm64, tools)

    def run_hook() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", hook, "hook", str(target)], capture_output=True, text=True, timeout=120)

    with overlay(tools.root, tmp_path) as target:
        (target / "usr/lib/modules/0.0-test/kernel").mkdir(parents=True)
        shutil.copy(module, target / "usr/lib/modules/0.0-test/kernel")
        dep, ran = target / "usr/lib/modules/0.0-test/modules.dep", target / "own-depmod-ran"
        # the same kmod: the tools tree's depmod writes the index
        own = target / "usr/sbin/depmod"
        own.unlink()
        own.write_text(f'#!/bin/sh\necho "$@" > /{ran.name}\n')
        own.chmod(0o755)
        proc = run_hook()
        assert proc.returncode == 0 and "runs emulated" not in proc.stderr, proc.stderr
        assert dep.read_text().startswith(f"kernel/{module.name}:") and not ran.exists()
        # another kmod in the tree: its own depmod runs, the tools tree's does not
        dep.unlink()
        set_version(target, "kmod", "0-other")
        proc = run_hook()
        assert proc.returncode == 0, proc.stderr
        assert "0-other in the tree: depmod runs emulated" in proc.stderr
        assert ran.read_text() == "-a 0.0-test\n" and not dep.exists()
        # the control: the fallback's failure is the hook's
        own.write_text("#!/bin/sh\nexit 1\n")
        assert run_hook().returncode != 0


def set_version(tree: Path, package: str, version: str) -> None:
    """Make the tree's dpkg database say another version of package is installed."""
    status = tree / "var/lib/dpkg/status"
    stanzas = status.read_text().split("\n\n")
    i = next(i for i, s in enumerate(stanzas) if s.startswith(f"Package: {package}\n"))
    stanzas[i] = "\n".join(f"Version: {version}" if line.startswith("Version: ") else line
                            for line in stanzas[i].splitlines())
    status.write_text("\n\n".join(stanzas))


def elf_machine(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[18:20], "little")


@contextlib.contextmanager
def overlay(lower: Path, tmp_path: Path) -> Iterator[Path]:
    """lower, writable at the returned path; what is written goes to tmp_path."""
    upper, work, target = tmp_path / "upper", tmp_path / "work", tmp_path / "target"
    for d in (upper, work, target):
        d.mkdir(parents=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                    str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_an_emulated_tree_unpacks_its_packages_with_a_native_dpkg_deb(tools: ToolsTree, tmp_path: Path) -> None:
    """While an arm64 tree's packages are installed, its dpkg-deb is the tools tree's, run natively
    with its own loader and libraries (eatmydata's too, which dpkg passes on): it reads a package as
    the tree's own does. Then the tree's own is back, the same bytes, no diversion left. With another
    dpkg-deb version in the tree, the tree's own never leaves, and the restore leaves it alone
    (control: the plain restore would delete it)."""
    from appliance.image import image_spec
    from appliance.image.rootfs import DPKG_DEB, NATIVE_DIR, _native_dpkg_deb_hook, _restore, _restore_emulated
    from appliance.profile import load_profile

    profile = PROFILES / "arm64-exit-node.yaml"
    spec = image_spec(load_profile(profile).profile)
    base = built_base(build(profile, tmp_path / "images", tmp_path / "secrets", "--json"))
    deb = next((CACHE / "debs").glob(f"wireguard-tools_*_{spec.arch}.deb"))
    own = (base.tree / DPKG_DEB[1:]).read_bytes()
    env = {**os.environ, **spec.emulator_env}
    native_here = elf_machine(Path(sys.executable).resolve())
    assert elf_machine(base.tree / DPKG_DEB[1:]) != native_here  # the tree's own runs emulated

    def in_tree(*cmd: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["chroot", str(target), *cmd], capture_output=True, env=env, timeout=120)

    def hook(script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", "-c", script, "hook", str(target)], capture_output=True, text=True, env=env,
                              timeout=300)

    def diverted() -> bool:
        return DPKG_DEB in in_tree("dpkg-divert", "--list").stdout.decode()

    with overlay(base.tree, tmp_path / "same") as target:
        shutil.copy(deb, target / "tmp/p.deb")
        proc = hook(_native_dpkg_deb_hook(tools))
        assert proc.returncode == 0 and "runs emulated" not in proc.stderr, proc.stderr
        assert os.readlink(target / DPKG_DEB[1:]) == f"{NATIVE_DIR}/dpkg-deb" and diverted()
        assert elf_machine(target / NATIVE_DIR[1:] / "dpkg-deb") == native_here
        native, emulated = (in_tree(p, "--fsys-tarfile", "/tmp/p.deb") for p in ("dpkg-deb", f"{DPKG_DEB}.distrib"))
        assert native.returncode == 0 and len(native.stdout) > 10_000 and native.stdout == emulated.stdout
        control = in_tree("dpkg-deb", "--control", "/tmp/p.deb", "/tmp/control")
        assert control.returncode == 0 and (target / "tmp/control/control").read_text().startswith("Package: ")
        preload = in_tree("env", "LD_PRELOAD=libeatmydata.so", "dpkg-deb", "--version")
        assert preload.returncode == 0 and not preload.stderr, preload.stderr
        proc = hook(_restore_emulated(spec)[0])
        assert proc.returncode == 0, proc.stderr
        assert (target / DPKG_DEB[1:]).read_bytes() == own and not (target / NATIVE_DIR[1:]).exists() and not diverted()

    with overlay(base.tree, tmp_path / "other") as target:
        other = target / DPKG_DEB[1:]
        other.write_text("#!/bin/sh\necho \"Debian 'dpkg-deb' package archive backend version 0-other (arm64).\"\n")
        own = other.read_bytes()
        proc = hook(_native_dpkg_deb_hook(tools))
        assert proc.returncode == 0 and "version 0-other (arm64).: dpkg-deb runs emulated" in proc.stderr, proc.stderr
        assert (target / DPKG_DEB[1:]).read_bytes() == own and not diverted()
        assert hook(_restore_emulated(spec)[0]).returncode == 0 and (target / DPKG_DEB[1:]).read_bytes() == own
        assert hook(" && ".join(_restore(DPKG_DEB))).returncode == 0 and not (target / DPKG_DEB[1:]).exists()
