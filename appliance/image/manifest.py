"""NAME.manifest.json: what an image is made of and what came out, as typed data.

Written beside every image; read back (from_json) by whatever compares images. The JSON layout is
the manifest's version 1: to_json gives exactly that shape."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .. import __version__
from .provenance import Source
from .rootfs import BaseTree
from .spec import ImageSpec

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class ProfileInfo:
    """Where the configuration came from: the profile's path, its digest and every file it extends."""

    path: str
    digest: str
    files: tuple[str, ...] = ()
    source: Source | None = None  # the git commit it was built from

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "digest": self.digest, "files": list(self.files),
                "source": self.source.to_json() if self.source else None}


@dataclass(frozen=True)
class OutputFile:
    sha256: str
    size: int
    allocated: int | None = None  # blocks the (sparse) file takes, the image only

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "size": self.size}
        if self.allocated is not None:
            out["allocated"] = self.allocated
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> OutputFile:
        allocated = raw.get("allocated")
        return cls(str(raw["sha256"]), int(raw["size"]), None if allocated is None else int(allocated))


@dataclass(frozen=True)
class KernelInfo:
    package: str
    version: str
    cmdline: str


@dataclass(frozen=True)
class BuildManifest:
    name: str
    appliance_version: str
    profile: ProfileInfo
    config_digest: str
    source_date_epoch: int
    suite: str
    snapshot: str | None
    base_key: str
    tools_key: str
    kernel: KernelInfo
    packages: dict[str, str]
    root_tree_bytes: int | None
    disk_size: int
    outputs: dict[str, OutputFile]
    started: int
    seconds: float
    stages: dict[str, float]
    tested: dict[str, Any] | None = None  # a passing `appliance test` of this profile, code and packages

    @classmethod
    def of_build(cls, *, spec: ImageSpec, config_digest: str, profile: ProfileInfo, base: BaseTree, tools_key: str,
                 suite: str, sde: int, cmdline: str, outputs: dict[str, OutputFile], disk_size: int, t_start: float,
                 stages: dict[str, float], tested: dict[str, Any] | None = None) -> BuildManifest:
        meta = base.entry.meta()
        return cls(name=spec.name, appliance_version=__version__, profile=profile, config_digest=config_digest,
                   source_date_epoch=sde, suite=suite, snapshot=meta.get("snapshot"), base_key=base.entry.key,
                   tools_key=tools_key, kernel=KernelInfo(spec.kernel_package, base.kernel_version, cmdline),
                   packages=base.packages, root_tree_bytes=meta.get("size"), disk_size=disk_size,
                   outputs=dict(outputs), started=int(t_start), seconds=round(time.time() - t_start, 2),
                   stages=dict(stages), tested=tested)

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest_version": MANIFEST_VERSION,
            "appliance_version": self.appliance_version,
            "name": self.name,
            "profile": self.profile.to_json(),
            "config_digest": self.config_digest,
            "source_date_epoch": self.source_date_epoch,
            "suite": self.suite,
            "snapshot": self.snapshot,
            "base_key": self.base_key,
            "tools_key": self.tools_key,
            "kernel": {"package": self.kernel.package, "version": self.kernel.version, "cmdline": self.kernel.cmdline},
            "packages": self.packages,
            "root_tree_bytes": self.root_tree_bytes,
            "disk_size": self.disk_size,
            "outputs": {k: v.to_json() for k, v in self.outputs.items()},
            "build": {"started": self.started, "seconds": self.seconds, "stages": self.stages},
            "tested": self.tested,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BuildManifest:
        if raw.get("manifest_version") != MANIFEST_VERSION:
            raise ValueError(f"manifest_version {raw.get('manifest_version')!r}, expected {MANIFEST_VERSION}")
        p, k, b = raw["profile"], raw["kernel"], raw["build"]
        return cls(name=raw["name"], appliance_version=raw["appliance_version"],
                   profile=ProfileInfo(p["path"], p["digest"], tuple(p.get("files", ())),
                                       Source.from_json(p.get("source"))),
                   config_digest=raw["config_digest"], source_date_epoch=int(raw["source_date_epoch"]),
                   suite=raw["suite"], snapshot=raw.get("snapshot"), base_key=raw["base_key"],
                   tools_key=raw["tools_key"], kernel=KernelInfo(k["package"], k["version"], k["cmdline"]),
                   packages=dict(raw["packages"]), root_tree_bytes=raw.get("root_tree_bytes"),
                   disk_size=int(raw["disk_size"]),
                   outputs={n: OutputFile.from_json(o) for n, o in raw["outputs"].items()},
                   started=int(b["started"]), seconds=float(b["seconds"]), stages=dict(b["stages"]),
                   tested=raw.get("tested"))
