"""appliance-netstack, the userspace dataplane's one binary, compiled from the Go source shipped in
appliance/dataplane/netstack/ against Debian trixie's Go packages (wireguard-go's library, gVisor's
TCP/IP stack, a SOCKS5 server), in a cached trixie tree that holds the Go toolchain.

Both are cache entries: the Go tree keyed by its package list, the binary by the tree and the source.
The binary is static (CGO_ENABLED=0), so the same file runs in the image and in the host's labs."""

from __future__ import annotations

import hashlib
import importlib.resources
import shutil
from pathlib import Path

from .cache import Cache, CacheKind, content_key
from .debian import Archive, mmdebstrap_args
from .platform import HOST, Platform
from .run import NULL_LOG, BuildLog, run
from .tools import ToolsTree

GO_PACKAGES = sorted([
    "golang-go", "golang-golang.zx2c4-wireguard-dev", "golang-gvisor-gvisor-dev",
    "golang-github-armon-go-socks5-dev", "golang-golang-x-net-dev",
])
GO_RECIPE = 1  # bump when the way the Go tree is made changes
NETSTACK_RECIPE = 1  # bump when the way the binary is compiled changes
BINARY = "appliance-netstack"
IMAGE_PATH = "usr/lib/appliance/appliance-netstack"


def sources() -> dict[str, bytes]:
    folder = importlib.resources.files("appliance").joinpath("dataplane", "netstack")
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".go")}


def _go_tree(cache: Cache, archive: Archive, log: BuildLog) -> ToolsTree:
    def make(tmp: Path) -> dict[str, object]:
        run([*mmdebstrap_args(cache.root / "debs"), f"--include={','.join(GO_PACKAGES)}",
             archive.suite, tmp / "tree", *archive.sources()], log=log, what="mmdebstrap (Go tree)")
        return {"packages": GO_PACKAGES}

    key = content_key({"packages": GO_PACKAGES, "suite": archive.suite, "recipe": GO_RECIPE})
    return ToolsTree(cache.get_or_build(CacheKind.GOTREE, key, make))


def build_netstack(cache: Cache | None = None, archive: Archive | None = None, log: BuildLog = NULL_LOG,
                   plat: Platform = HOST) -> Path:
    """The compiled binary for plat, from the cache when this source was compiled before. Go
    cross-compiles by itself (GOARCH): nothing is emulated."""
    cache = cache or Cache()
    archive = archive or Archive.from_env()
    src = sources()
    tree = _go_tree(cache, archive, log)

    def make(tmp: Path) -> dict[str, object]:
        work = tmp / "src"
        work.mkdir()
        for name, data in src.items():
            (work / name).write_bytes(data)
        # Debian's Go libraries live in /usr/share/gocode (GOPATH mode, no module downloads)
        env = {"HOME": "/tmp", "GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOCACHE": f"{tmp}/gocache",
               "GOTELEMETRY": "off", "CGO_ENABLED": "0", "GOFLAGS": "-trimpath", "GOARCH": plat.goarch}
        tree.run(["sh", "-c", f"cd {work} && go vet . && go build -ldflags=-s -o {tmp / BINARY} ."],
                 binds=[tmp], log=log, env=env, what="go build (appliance-netstack)")
        shutil.rmtree(tmp / "gocache", ignore_errors=True)
        shutil.rmtree(work)
        return {"sha256": hashlib.sha256((tmp / BINARY).read_bytes()).hexdigest()}

    digest = {name: hashlib.sha256(data).hexdigest() for name, data in src.items()}
    # the host's key is as it was before other architectures (its cached binary stays valid)
    arch = {} if plat == HOST else {"goarch": plat.goarch}
    key = content_key({"tree": tree.entry.key, "sources": digest, "recipe": NETSTACK_RECIPE, **arch})
    return cache.get_or_build(CacheKind.NETSTACK, key, make).path / BINARY
