"""Profile + keys -> ConfigTree: every file the appliance's configuration consists of."""

from __future__ import annotations

import importlib.resources
from typing import Any

import jinja2

from .. import __version__
from ..dataplane import config as dp
from ..dataplane.config import RTPROT_APPLIANCE, rule_families
from ..dataplane.health import HEALTH_CONFIG, HealthConfig
from ..profile.model import Profile, StaticIPv4, UserspaceDataplane
from ..secrets import ApplianceKeys, needs_socks5_password
from .context import (
    CREDSTORE,
    LINK_GROUPS,
    NFT_TABLE,
    PRIVATE_KEY_CREDENTIAL,
    SOCKS5_PASSWORD_CREDENTIAL,
    SOCKS5_USER,
    WG_IFACE,
    Context,
    build_context,
    credential_path,
    psk_credential,
)
from .tree import ConfigTree

DATAPLANE_JSON = "etc/appliance/dataplane.json"
HEALTH_JSON = str(HEALTH_CONFIG).lstrip("/")
NFTABLES_DROPIN = "etc/systemd/system/nftables.service.d/10-appliance.conf"
MODPROBE = "ExecStartPre=/usr/sbin/modprobe -a"
# Not modules-load.d: systemd-sysctl waits for systemd-modules-load and networkd for systemd-sysctl,
# so the uplink's DHCP would wait for these loads too (~2.5 s of CPU under emulation).
_MODPROBE_WHY = ("# the ruleset's and the tunnel's kernel modules, in one pass (on demand the kernel starts\n"
                 "# modprobe once per module); here rather than in modules-load.d, which systemd-sysctl and\n"
                 "# so networkd wait for: the uplink's address need not wait for these\n")
DATAPLANE_SCHEMA = 1
# on the data partition (the root is read-only): made at first boot, kept across updates
SSH_HOST_KEY = "/var/lib/ssh/ssh_host_ed25519_key"
# the SOCKS5 password's name in the userspace dataplane's $CREDENTIALS_DIRECTORY
USERSPACE_SOCKS5_CREDENTIAL = "socks5-password"
# Coldplug in two passes, network devices first and settled. In one pass (Debian's: all devices, net
# among the first) a NIC's rename queues its "move" event behind every other device's, and networkd
# does not touch a link whose rename udev has not finished: the uplink waited for the whole
# coldplug, ~2 s under emulation. A NIC whose driver the second pass loads appears as usual.
_UDEV_TRIGGER = ("[Service]\n# net first, settled (renames done), then the rest: see appliance's renderer\n"
                 "ExecStart=\n"
                 "ExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=net --settle\n"
                 "ExecStart=-udevadm trigger --type=all --action=add --subsystem-nomatch=net "
                 "--prioritized-subsystem=module,block,tpmrm,tty,input\n")

# Debian orders networkd after the firewall (network-pre.target) but starts it when the ruleset
# failed to load. The appliance does not: networkd brings up the uplink and the kernel's WireGuard.
_FIREWALL_FIRST = ("[Unit]\n# no firewall, no network: the uplink and the tunnel come up only with the appliance's\n"
                   "# ruleset loaded (stopping nftables.service stops the network; its reload does not)\n"
                   "Requires=nftables.service\nAfter=nftables.service\n")


# Debian's units that networkd starts after, in order; each is short, but at boot everything starts
# at once and a unit that waits for the CPU holds up the ones after it.
_UPLINK_PATH = {
    "kmod-static-nodes.service": "udevd starts after /dev's static nodes",
    "systemd-tmpfiles-setup-dev-early.service": "udevd starts after /dev's static nodes",
    "systemd-udevd.service": "udev names the uplink before networkd may configure it",
    "systemd-sysctl.service": "networkd starts after the sysctls",
    "systemd-networkd.service": "the uplink's address is on the tunnel's way up",
}


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("appliance.render", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def enabled_units(p: Profile) -> list[str]:
    """Debian's units the image enables (in the base tree, where their unit files are)."""
    units = ["nftables.service", "ssh.service", "systemd-networkd.service", "systemd-resolved.service"]
    return sorted(units)


def appliance_units(p: Profile) -> list[str]:
    """The appliance's own units, shipped and enabled by the rendered tree."""
    units = ["appliance-dataplane.service", "appliance-health.service"]
    if p.wireguard_go_tun:
        units.append("appliance-wireguard-go.service")
    if p.userspace:
        units.append("appliance-userspace.service")
    return sorted(units)


DATAPLANE_CODE = "usr/lib/appliance/python/appliance"


def _dataplane_code(t: ConfigTree) -> None:
    """The reconciler's own source, run by the image's python3 (with python3-pyroute2)."""
    package = importlib.resources.files("appliance")
    t.file(f"{DATAPLANE_CODE}/__init__.py", f'"""appliance {__version__}: the on-device parts."""\n')
    for f in sorted(package.joinpath("dataplane").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".py"):
            t.file(f"{DATAPLANE_CODE}/dataplane/{f.name}", f.read_bytes())


def render(p: Profile, keys: ApplianceKeys) -> ConfigTree:
    ctx = build_context(p)
    env = _env()
    base: dict[str, Any] = {
        "p": p,
        "ctx": ctx,
        "wg_iface": WG_IFACE,
        "nft_table": NFT_TABLE,
        "private_key_credential": PRIVATE_KEY_CREDENTIAL,
        "psk_credential": psk_credential,
        "credential_path": credential_path,
        "socks5_password": needs_socks5_password(p) and f"{USERSPACE_SOCKS5_CREDENTIAL}:"
                           f"{credential_path(SOCKS5_PASSWORD_CREDENTIAL)}",
    }

    def tpl(name: str, **extra: Any) -> str:
        return env.get_template(name).render(**base, **extra)

    t = ConfigTree()
    _system(t, p)
    for link in ctx.links:
        t.file(f"etc/systemd/network/10-{link.role}.network", tpl("link.network.j2", link=link))
        t.file(f"etc/systemd/system/appliance-offload-{link.role}@.service", tpl("offload.service.j2", link=link))
    t.file("etc/udev/rules.d/90-appliance-offload.rules", tpl("offload.rules.j2"))
    if ctx.kernel_wireguard:
        t.file(f"etc/systemd/network/30-{WG_IFACE}.netdev", tpl("wg.netdev.j2"))
    if ctx.kernel_forwarding:
        t.file(f"etc/systemd/network/30-{WG_IFACE}.network", tpl("wg.network.j2", rtprot=RTPROT_APPLIANCE,
                                                                 rule_family=_rule_family(p, ctx)))
    t.file("etc/systemd/networkd.conf.d/appliance.conf", tpl("networkd.conf.j2"))
    _dataplane_code(t)
    t.file("usr/sbin/appliance-dataplane", tpl("dataplane-launcher.j2", version=__version__), mode=0o755)
    t.file("etc/systemd/system/appliance-dataplane.service", tpl("dataplane.service.j2"))
    if p.wireguard_go_tun:
        t.file("etc/systemd/system/appliance-wireguard-go.service", tpl("wireguard-go.service.j2"))
    for unit in appliance_units(p):  # what `systemctl enable` makes for WantedBy=multi-user.target
        t.symlink(f"etc/systemd/system/multi-user.target.wants/{unit}", f"/etc/systemd/system/{unit}")
    # No rule for DHCPv4 replies: networkd's client reads them from a packet socket (before nftables)
    # until it has a lease, and its unicast renewals' replies are conntrack's "established".
    t.file("etc/nftables.conf", tpl("nftables.conf.j2", dhcpv6=_any(ctx, "ipv6", "ra"),
                                     forwarding=ctx.kernel_forwarding, socks5=_socks5_opening(p, ctx),
                                     lan_group=LINK_GROUPS["lan"]), mode=0o755)
    if p.userspace:
        t.file("etc/systemd/system/appliance-userspace.service", tpl("userspace.service.j2"))
        t.file("etc/sysusers.d/appliance.conf",
               'u appliance-dp - "appliance userspace dataplane" /nonexistent /usr/sbin/nologin\n')
    t.file(NFTABLES_DROPIN, _first_on_cpu("the tunnel and the uplink wait for the firewall",
                                          _MODPROBE_WHY + f"{MODPROBE} {' '.join(boot_modules(p))}\n"))
    for unit, why in _UPLINK_PATH.items():
        t.file(f"etc/systemd/system/{unit}.d/10-appliance.conf", _first_on_cpu(why))
    t.file("etc/systemd/system/systemd-networkd.service.d/20-firewall-first.conf", _FIREWALL_FIRST)
    t.file("etc/systemd/system/systemd-udev-trigger.service.d/10-appliance.conf", _UDEV_TRIGGER)
    t.file("etc/sysctl.d/90-appliance.conf", tpl("sysctl.conf.j2"))
    t.file("etc/systemd/system.conf.d/10-appliance-watchdog.conf", _WATCHDOG)
    t.file(EMERGENCY_DROPIN, _EMERGENCY)
    if p.metrics.listen_on:
        t.file("etc/systemd/system/appliance-metrics.socket", tpl("metrics.socket.j2", listen=metrics_listeners(p)))
        t.file("etc/systemd/system/appliance-metrics.service", tpl("metrics.service.j2"))
        t.symlink("etc/systemd/system/sockets.target.wants/appliance-metrics.socket",
                  "/etc/systemd/system/appliance-metrics.socket")
    if dns_listeners(p) or p.dns.upstreams:
        t.file("etc/systemd/resolved.conf.d/appliance.conf", tpl("resolved.conf.j2", listen=dns_listeners(p)))
    t.file("etc/ssh/sshd_config.d/10-appliance.conf", tpl("sshd.conf.j2", host_key=SSH_HOST_KEY))
    t.file("etc/systemd/system-preset/10-appliance.preset", tpl("preset.j2", units=enabled_units(p)))
    t.file(DATAPLANE_JSON, dataplane_config(p, ctx).dumps())
    t.file(HEALTH_JSON, health_config(p).dumps())
    t.file("etc/systemd/system/appliance-health.service", tpl("health.service.j2"))
    t.file("etc/systemd/system/appliance-rollback.service", tpl("rollback.service.j2"))
    t.symlink("etc/systemd/system/boot-complete.target.requires/appliance-health.service",
              "/etc/systemd/system/appliance-health.service")
    _secrets(t, p, keys)
    return t


def health_config(p: Profile) -> HealthConfig:
    """What appliance-health.service checks: the profile's SSH port, grace time and handshakes, and
    whether the uplink gets a default route (DHCP, router advertisements or a gateway)."""
    uplink = p.interfaces.uplink
    default_route = uplink is not None and any(
        cfg in ("dhcp", "ra") or (not isinstance(cfg, str) and cfg.gateway is not None)
        for cfg in (uplink.ipv4, uplink.ipv6))
    h = p.health
    return HealthConfig(p.system.ssh.port, h.grace, default_route, tuple(h.handshake_with), h.within)


# where resolved's own stub listens: the userspace dataplane relays peers' DNS there
RESOLVED_STUB = "127.0.0.53"


def dns_listeners(p: Profile) -> list[str]:
    """Addresses resolved answers on besides its loopback stub: the tunnel's (kernel mode: the host
    holds them on wg0; in userspace mode the netstack relays them to the stub) and the LAN's."""
    found = [str(a.ip) for a in p.wireguard.addresses] if p.dns.serve and p.kernel_mode else []
    lan = p.interfaces.lan
    if p.dns.lan and lan is not None and isinstance(lan.ipv4, StaticIPv4):
        found.append(str(lan.ipv4.address.ip))
    return found


def metrics_listeners(p: Profile) -> list[str]:
    """ListenStream= addresses of the metrics endpoint: the tunnel's (kernel mode; in userspace mode
    the netstack relays the tunnel address's port to loopback) and the LAN's."""
    port = p.metrics.port
    found = []
    if "tunnel" in p.metrics.listen_on:
        if p.kernel_mode:
            found += [f"{a.ip}:{port}" if a.version == 4 else f"[{a.ip}]:{port}" for a in p.wireguard.addresses]
        else:
            found.append(f"127.0.0.1:{port}")
    lan = p.interfaces.lan
    if "lan" in p.metrics.listen_on and lan is not None and isinstance(lan.ipv4, StaticIPv4):
        found.append(f"{lan.ipv4.address.ip}:{port}")
    return found


def _first_on_cpu(why: str, service: str = "") -> str:
    """A drop-in for a Debian unit on the tunnel's way up at boot, when everything starting at once
    shares a few (or emulated) CPUs: its [Service] section, with `service` lines first. The
    appliance's own units say the same."""
    return f"[Service]\n{service}# {why}: it comes first when the CPU is short\nCPUWeight=1000\nNice=-10\n"


# PID 1 keeps the hardware watchdog (where the board has one) fed: a hung kernel or PID 1 is reset
# and the boot counts as a failed try; a reboot that hangs is cut short too. With the driver's own
# timeout ("default"; i6300esb and Intel's iTCO 30 s, the Pi 4's 15 s): systemd disarms the watchdog
# when asked for more than the driver's maximum (the Pi 4's bcm2835_wdt refused the 30 s and 2 min
# set before, and ran unguarded), and which driver a generic image meets is not known at build time.
_WATCHDOG = ("[Manager]\n# a hung system is reset: with boot counting, a failed try. The driver's own timeout:\n"
             "# systemd disarms a watchdog asked for more than the driver's maximum (the Pi 4's is 15 s)\n"
             "RuntimeWatchdogSec=default\nRebootWatchdogSec=default\n")


EMERGENCY_DROPIN = "etc/systemd/system/emergency.service.d/10-appliance.conf"
# A boot that fails early (a mount, a unit local-fs.target requires) ends in emergency mode, whose shell
# nobody can open (root has no password) and which keeps the watchdog fed: the device would wait there
# until someone pulls its plug, never counting the try. It shows what failed on the console and
# reboots instead: with boot counting a failed try (three, and a new root falls back to the previous
# one), and a failure that passes (a slow disk) gets another boot. Not at once: a device whose boot
# keeps failing reboots about once a minute, not as fast as it can (systemd-boot rewrites its random
# seed on the ESP at every boot: flash wears).
_EMERGENCY = ("[Unit]\n# a shell nobody can open: what failed goes to the console, then a reboot (a failed try)\n"
              "SuccessAction=reboot\nFailureAction=reboot\n\n"
              # one process, which has started at once (Type=idle): a oneshot would keep emergency.target's
              # irreversible start job waiting, and the reboot's transaction would be refused
              "[Service]\nExecStartPre=\nExecStart=\n"
              "ExecStart=-/bin/sh -c 'systemctl --failed --no-pager --no-legend; "
              "echo \"appliance: this boot failed (the units above), rebooting in 30 s\"; sleep 30'\n")


def boot_modules(p: Profile) -> list[str]:
    """Kernel modules the rendered ruleset and the kernel's WireGuard need at every boot (counters,
    sets, payload matches and `tcp option maxseg`/`rt mtu` are built into nf_tables). wireguard-go's
    tun is loaded by its own unit."""
    modules = ["nf_tables", "nft_ct"]
    if p.kernel_mode and p.masquerade_families:
        modules += ["nft_chain_nat", "nft_masq"]
    if p.kernel_wireguard:
        modules.append("wireguard")
    return modules


def _socks5_opening(p: Profile, ctx: Context) -> dict[str, Any] | None:
    """Where the firewall lets other hosts reach the userspace dataplane's SOCKS5 proxy: its address,
    on the interface that address belongs to, and nowhere else (none on loopback)."""
    if not isinstance(p.dataplane, UserspaceDataplane):
        return None
    ip, port = p.dataplane.socks5_address
    role = p.link_with_address(ip)
    if ip.is_loopback or role is None:
        return None
    group = next(link.group for link in ctx.links if link.role == role)
    return {"group": group, "family": "ip" if ip.version == 4 else "ip6", "address": str(ip), "port": port}


def _rule_family(p: Profile, ctx: Context) -> str:
    """networkd's Family= for the policy rule: the reconciler's families."""
    versions = rule_families(map(str, ctx.peer_routes), map(str, p.wireguard.addresses))
    return "both" if versions == {4, 6} else f"ipv{versions.pop()}"


def _any(ctx: Context, family: str, mode: str) -> bool:
    return any(getattr(link, family) == mode for link in ctx.links)


def _system(t: ConfigTree, p: Profile) -> None:
    t.file("etc/hostname", f"{p.name}\n")
    t.file("etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{p.name}\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    t.file("etc/timezone", f"{p.system.timezone}\n")
    t.symlink("etc/localtime", f"/usr/share/zoneinfo/{p.system.timezone}")
    t.dir("root/.ssh", 0o700)
    keys = "".join(f"{k}\n" for k in p.system.ssh.authorized_keys)
    t.file("root/.ssh/authorized_keys", keys, mode=0o600)


def _secrets(t: ConfigTree, p: Profile, keys: ApplianceKeys) -> None:
    t.dir(CREDSTORE, 0o700)
    t.file(f"{CREDSTORE}/{PRIVATE_KEY_CREDENTIAL}", keys.private_key + "\n", mode=0o600, secret=True)
    if needs_socks5_password(p):
        if not keys.socks5_password:
            raise ValueError("the SOCKS5 proxy listens beyond loopback: its password must come from the secret store")
        t.file(f"{CREDSTORE}/{SOCKS5_PASSWORD_CREDENTIAL}", keys.socks5_password + "\n", mode=0o600, secret=True)
    for peer in p.wireguard.peers:
        if peer.preshared_key:
            t.file(f"{CREDSTORE}/{psk_credential(peer.name)}", keys.preshared_keys[peer.name] + "\n",
                   mode=0o600, secret=True)


def dataplane_config(p: Profile, ctx: Context) -> dp.DataplaneConfig:
    """What the on-device reconciler applies. Public material only: keys are referenced by path."""
    userspace = isinstance(p.dataplane, UserspaceDataplane)
    wireguard = dp.WireGuardConfig(
        implementation=dp.Implementation(p.dataplane.wireguard), interface=WG_IFACE,
        listen_port=p.wireguard.listen_port, mtu=p.wireguard.mtu,
        addresses=tuple(str(a) for a in p.wireguard.addresses),
        private_key_file=credential_path(PRIVATE_KEY_CREDENTIAL),
        peers=tuple(dp.PeerConfig(
            name=peer.name, public_key=peer.public_key, allowed_ips=tuple(str(n) for n in peer.allowed_ips),
            endpoint=peer.endpoint, persistent_keepalive=peer.persistent_keepalive,
            preshared_key_file=credential_path(psk_credential(peer.name)) if peer.preshared_key else None)
            for peer in p.wireguard.peers))
    links = tuple(dp.LinkConfig(link.role, link.match_name, link.match_mac, link.group, link.ethtool_features)
                  for link in ctx.links)
    return dp.DataplaneConfig(
        name=p.name, mode=dp.Mode(p.dataplane.mode), wireguard=wireguard, table=p.routing.table,
        rule_priority=p.routing.rule_priority, routes=tuple(str(n) for n in ctx.peer_routes), links=links,
        sysctl=dict(ctx.sysctls), firewall_table=NFT_TABLE, shields_up=p.firewall.shields_up,
        socks5=p.dataplane.socks5 if isinstance(p.dataplane, UserspaceDataplane) else None,
        # RFC 1929: user "appliance", the password handed over as a credential (LoadCredential=)
        socks5_auth=dp.Socks5Auth(SOCKS5_USER, USERSPACE_SOCKS5_CREDENTIAL) if needs_socks5_password(p) else None,
        # the kernel mode's forward_from_peers chain, for the userspace stack to apply itself
        filter=tuple(r.to_dataplane() for r in ctx.forward_rules) if userspace else (),
        # the appliance's own services peers may reach on its tunnel address (shields down); in kernel
        # mode whatever listens on that address, here only these, relayed to loopback
        services=_userspace_services(p) if userspace else ())


def _userspace_services(p: Profile) -> tuple[dp.Service, ...]:
    """The appliance's own services peers reach on its tunnel address in userspace mode: SSH unless
    shields are up, and the resolver (resolved's stub) when the profile serves DNS, shields or not."""
    services = [] if p.firewall.shields_up else [dp.Service("tcp", p.system.ssh.port)]
    if p.dns.serve:
        services += [dp.Service(proto, 53, RESOLVED_STUB) for proto in ("udp", "tcp")]
    if "tunnel" in p.metrics.listen_on:
        services.append(dp.Service("tcp", p.metrics.port, "127.0.0.1"))
    return tuple(services)
