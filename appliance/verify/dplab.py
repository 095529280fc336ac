"""Dataplane labs in network namespaces, shared by the tests and `make bench`:
client (a WireGuard peer) <-> appliance <-> server, with the appliance's dataplane as the image runs it.

  plain:     the appliance only routes (no WireGuard): the ceiling
  kernel:    wireguard-go on the appliance, the rendered ruleset, the reconciler (kernel mode)
  userspace: the rootless dataplane (appliance-netstack: wireguard-go + gVisor's stack) as an unprivileged uid

Addresses: client-appliance 198.18.50.0/24, appliance-server 198.18.60.0/24 and 2001:db8:60::/64,
tunnel 100.64.9.0/24 and fd7a:115c:a1e0:9::/64 (a ULA: the appliance masquerades it, NAT66)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..image.netstack import build_netstack
from ..profile import load_profile
from ..render import render
from ..render.context import SOCKS5_PASSWORD_CREDENTIAL, credential_path
from ..render.renderer import USERSPACE_SOCKS5_CREDENTIAL
from ..runner import run
from ..secrets import SecretStore, appliance_keys, generate_private_key, public_key
from .netns import Lab, LabCommandFailed, start_peer, start_wireguard_go, wait_for

UID = 64123  # the unprivileged dataplane user of the userspace lab (no passwd entry needed)
SERVER = "198.18.60.2"
APPLIANCE_UPLINK = "198.18.60.1"
SERVER6 = "2001:db8:60::2"
APPLIANCE_UPLINK6 = "2001:db8:60::1"
ENDPOINT = "198.18.50.1"

PROFILE = """\
name: dplab
roles: [exit-node]
interfaces:
  uplink:
    match: {{name: "a1"}}
    ipv4: {{address: 198.18.60.1/24, gateway: 198.18.60.2}}
    ipv6: {{address: "2001:db8:60::1/64", gateway: "2001:db8:60::2"}}
wireguard:
  addresses: [100.64.9.1/32, "fd7a:115c:a1e0:9::1/128"]
  mtu: {mtu}
  peers:
    - {{name: client, public_key: "{client}", allowed_ips: [100.64.9.2/32, "fd7a:115c:a1e0:9::2/128"]}}
dataplane: {dataplane}
{extra}"""


@dataclass
class DataplaneLab:
    lab: Lab
    mode: str
    client: str
    appliance: str
    server: str
    dataplane: subprocess.Popen[bytes] | None = None
    # userspace mode: start the dataplane again, as systemd's Restart= does; returns the new process
    restart: Callable[[str], subprocess.Popen[bytes]] | None = None

    def close(self) -> None:
        self.lab.close()


def _topology(lab: Lab) -> tuple[str, str, str]:
    client, appl, server = lab.ns("client"), lab.ns("appl"), lab.ns("server")
    lab.veth((client, "c0", "198.18.50.2/24"), (appl, "a0", f"{ENDPOINT}/24"))
    lab.veth((appl, "a1", f"{APPLIANCE_UPLINK}/24"), (server, "s0", f"{SERVER}/24"))
    lab.run(appl, ["ip", "route", "add", "default", "via", SERVER])
    # nodad: usable at once (duplicate address detection would hold them back ~2 s)
    lab.run(appl, ["ip", "addr", "add", f"{APPLIANCE_UPLINK6}/64", "dev", "a1", "nodad"])
    lab.run(server, ["ip", "addr", "add", f"{SERVER6}/64", "dev", "s0", "nodad"])
    lab.run(appl, ["ip", "-6", "route", "add", "default", "via", SERVER6])
    return client, appl, server


def start(mode: str, *, wireguard_go: str = "wireguard-go", mtu: int = 1420, tag: str = "d",
          extra: str = "", socks5: str = "127.0.0.1:1080", ssh_port: int = 22) -> DataplaneLab:
    """A running lab; the caller closes it (also on failure: use try/finally). extra: more of the
    profile's YAML (a firewall section, the SSH port say)."""
    lab = Lab(tag)
    try:
        client, appl, server = _topology(lab)
        d = DataplaneLab(lab, mode, client, appl, server)
        if mode == "plain":
            lab.run(appl, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            lab.run(client, ["ip", "route", "add", "198.18.60.0/24", "via", ENDPOINT])
            lab.run(server, ["ip", "route", "add", "198.18.50.0/24", "via", APPLIANCE_UPLINK])
            return d
        client_key = generate_private_key()
        dataplane = "{mode: kernel, wireguard: wireguard-go}" if mode == "kernel" else \
            f'{{mode: userspace, socks5: "{socks5}"}}'
        profile = lab.dir / "dplab.yaml"
        system = f"system: {{ssh: {{port: {ssh_port}}}}}\n" if ssh_port != 22 else ""
        profile.write_text(PROFILE.format(mtu=mtu, client=public_key(client_key), dataplane=dataplane,
                                          extra=system + extra))
        p = load_profile(profile).profile
        store = SecretStore(lab.dir / "secrets")
        root = lab.dir / "root"
        render(p, appliance_keys(store, p)).write(root, include_secrets=True)
        dp = json.loads((root / "etc/appliance/dataplane.json").read_text())
        key_file = root / dp["wireguard"]["private_key_file"].lstrip("/")
        # host-wide buffer limits are read-only inside a lab namespace
        dp["sysctl"] = {k: v for k, v in dp["sysctl"].items() if not k.startswith("net.core.")}
        if mode == "kernel":
            dp["wireguard"]["private_key_file"] = str(key_file)
            (lab.dir / "dataplane.json").write_text(json.dumps(dp))
            lab.run(appl, ["nft", "-f", root / "etc/nftables.conf"])
            start_wireguard_go(lab, appl, "wg0", "wg-appl", wireguard_go)
            lab.run(appl, [sys.executable, "-m", "appliance.dataplane", "--config", lab.dir / "dataplane.json",
                           "apply"])
        else:
            d.restart = _userspace_launcher(lab, appl, root, dp, key_file)
            d.dataplane = d.restart("dataplane")
        _client(lab, client, profile, client_key, wireguard_go)
        if not extra:  # a firewall may refuse the ping
            wait_for(lambda: lab.run(client, ["ping", "-c", "1", "-W", "2", SERVER], check=False).returncode == 0,
                     30, 0.5)
        return d
    except BaseException:
        lab.close()
        raise


def _userspace_launcher(lab: Lab, ns: str, root: Path, dp: dict[str, object], key_file: Path
                        ) -> Callable[[str], subprocess.Popen[bytes]]:
    """Install the dataplane as the image has it; the returned function starts it (log name) and
    waits until it is up."""
    lab.run(ns, ["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])  # as the image's sysctl.d
    private = lab.dir / "dp"
    private.mkdir()
    (private / "dataplane.json").write_text(json.dumps(dp))
    creds = private / "credentials"  # what LoadCredential= gives the service
    creds.mkdir()
    (private / "state").mkdir()  # StateDirectory=
    (creds / "wireguard-private-key").write_bytes(key_file.read_bytes())
    password = root / credential_path(SOCKS5_PASSWORD_CREDENTIAL).lstrip("/")
    if password.exists():  # a proxy beyond loopback: its password, as LoadCredential= hands it over
        (creds / USERSPACE_SOCKS5_CREDENTIAL).write_bytes(password.read_bytes())
    # the image's launcher, the copy of the code shipped in the image (not this checkout) and the
    # binary the image build compiles
    shipped = root / "usr/lib/appliance/python"
    launcher = (root / "usr/sbin/appliance-dataplane").read_text()
    launcher = launcher.replace("/usr/lib/appliance/python", str(private / "python"))
    (private / "appliance-dataplane").write_text(launcher)
    shutil.copytree(shipped, private / "python")
    shutil.copy(build_netstack(), private / "appliance-netstack")
    for d in (lab.dir, lab.dir / "run"):  # traversable (not listable) for the unprivileged uid
        os.chmod(d, 0o711)
    for path in [private, *private.rglob("*"), lab.rundir(ns), lab.rundir(ns) / "wireguard"]:
        os.chown(path, UID, UID)
    cmd: list[str | Path] = ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--inh-caps=-all", "--",
           # Debian's python3, as in the image (a venv may sit under /root)
           "env", "--chdir=/", f"CREDENTIALS_DIRECTORY={creds}", f"STATE_DIRECTORY={private / 'state'}",
           "/usr/bin/python3", private / "appliance-dataplane",
           "--config", private / "dataplane.json", "userspace", "--netstack", private / "appliance-netstack"]

    def launch(name: str) -> subprocess.Popen[bytes]:
        proc = lab.spawn(ns, cmd, name)
        wait_for(lambda: "userspace dataplane up" in lab.log(name) or proc.poll() is not None, 30)
        if proc.poll() is not None:
            raise RuntimeError(f"the userspace dataplane exited:\n{lab.log(name)}")
        return proc

    return launch


def _client(lab: Lab, ns: str, profile: Path, key: str, wireguard_go: str) -> None:
    """The peer, configured from `appliance peer` output, sending everything into the tunnel."""
    (lab.dir / "client.key").write_text(key)
    # the installed command, as a user runs it (no source checkout needed)
    conf = run([sys.executable, "-m", "appliance", "peer", profile, "client", "--endpoint", f"{ENDPOINT}:51820",
                "--private-key-file", lab.dir / "client.key", "--secrets", lab.dir / "secrets"],
               error=LabCommandFailed).stdout
    start_peer(lab, ns, "wgc", conf, mtu=1420, binary=wireguard_go)
    lab.run(ns, ["ip", "route", "add", "default", "dev", "wgc"])
    lab.run(ns, ["ip", "-6", "route", "add", "default", "dev", "wgc"])
