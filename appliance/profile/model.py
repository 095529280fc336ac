"""The device profile: one YAML file per appliance, validated into these models.

Field descriptions double as the profile reference (README) and the JSON Schema editors use.
Checks that span several fields live in checks.py so each error can point at the exact field.
"""

from __future__ import annotations

import functools
import ipaddress
import zoneinfo
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PlainValidator, Tag, WithJsonSchema, field_validator

from .acl import AclDestination
from .types import (
    Address,
    DomainName,
    HostPort,
    Interface,
    InterfaceName,
    IPAddress,
    ListenAddress,
    MacAddress,
    ModuleName,
    Name,
    Network,
    PackageName,
    Port,
    SshPublicKey,
    TimezoneName,
    WireGuardKey,
    check_name,
    split_host_port,
)

Role = Literal["exit-node", "subnet-router"]
# The tunnel's interface on the device (fixed: nftables, networkd and the dataplane name it)
TUNNEL_INTERFACE = "wg0"
RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently drop a setting. Strict types: YAML's `true`
    is not the port 1, "1420 " is not a number and `yes` is not a boolean."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@functools.cache
def _timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


# Boards a profile may name, with the architectures each runs (a board outside its list is an error
# at the board's line, not a failed build)
BOARD_ARCHES: dict[str, tuple[str, ...]] = {"generic": ("amd64", "arm64"), "qemu": ("amd64", "arm64"),
                                            "rpi4": ("arm64",)}
# Boards people will ask for, and why they are not buildable yet
UNSUPPORTED_BOARDS = {
    "rpi5": "rpi5 is not supported yet: its Ethernet sits behind the RP1 chip, which Debian trixie's kernel "
            "(6.12) has no driver for; trixie-backports' kernels have one, but images are built from trixie "
            "main only. Use rpi4, or generic with UEFI firmware",
}


class Ssh(Strict):
    authorized_keys: list[SshPublicKey] = Field(
        default_factory=list, description="OpenSSH public keys allowed to log in as root (key login only)")
    port: Port = Field(22, description="TCP port sshd listens on")


class System(Strict):
    board: Literal["generic", "qemu", "rpi4"] = Field(
        "generic", description="generic: real hardware booting by UEFI (full kernel, initramfs-tools); qemu: "
                              "virtual machines booting from a virtio-blk or NVMe disk (cloud kernel, "
                              "tiny-initramfs); rpi4: Raspberry Pi 4, 400 and CM4, booted by the Pi's own "
                              "firmware (arm64 only)")
    arch: Literal["amd64", "arm64"] = Field("amd64", description="Debian architecture of the image")
    timezone: TimezoneName = Field("UTC", description="IANA time zone, e.g. Europe/Amsterdam")
    ssh: Ssh = Field(default_factory=Ssh, description="management SSH")
    packages: list[PackageName] = Field(
        default_factory=list, description="extra Debian packages to install into the image")
    kernel_modules: list[ModuleName] = Field(
        default_factory=list, description="kernel modules kept in the image although their kind is left out "
                                          "(sound, video, cameras, Wi-Fi, ...: see \"Boards and architectures\"), "
                                          "with what they depend on")

    @field_validator("board", mode="before")
    @classmethod
    def _supported_board(cls, value: Any) -> Any:
        if isinstance(value, str) and value in UNSUPPORTED_BOARDS:  # anything else: the type's own error
            raise ValueError(UNSUPPORTED_BOARDS[value])
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        zones = _timezones()
        if zones and value not in zones:
            raise ValueError("expected an IANA time zone such as UTC or Europe/Amsterdam")
        return value


class InterfaceMatch(Strict):
    name: InterfaceName | None = Field(None, description="interface name or glob, e.g. en* or enp1s0")
    mac: MacAddress | None = Field(None, description="permanent MAC address, e.g. 52:54:00:12:34:56")


class StaticIPv4(Strict):
    address: Interface = Field(description="address with prefix length, e.g. 192.168.10.1/24")
    gateway: Address | None = Field(None, description="default gateway (uplink only)")
    dns: list[Address] = Field(default_factory=list, description="DNS servers")


class StaticIPv6(Strict):
    address: Interface = Field(description="address with prefix length, e.g. 2001:db8::1/64")
    gateway: Address | None = Field(None, description="default gateway (uplink only)")


def _mode_or_static(value: Any) -> str:
    # dicts while validating, model instances while serialising
    return "static" if isinstance(value, dict | BaseModel) else "mode"


IPv4Config = Annotated[
    Annotated[Literal["dhcp", "off"], Tag("mode")] | Annotated[StaticIPv4, Tag("static")],
    Discriminator(_mode_or_static),
]
IPv6Config = Annotated[
    Annotated[Literal["ra", "off"], Tag("mode")] | Annotated[StaticIPv6, Tag("static")],
    Discriminator(_mode_or_static),
]


class Offload(Strict):
    udp_gro_forwarding: bool = Field(
        True, description="rx-udp-gro-forwarding on the NIC (Linux >= 6.2): aggregates forwarded WireGuard UDP")
    gro_list: bool = Field(False, description="rx-gro-list; keep off so UDP GRO forwarding is used instead")


class NetInterface(Strict):
    match: InterfaceMatch = Field(description="which NIC this is: by name (glob) or by MAC")
    ipv4: IPv4Config = Field("dhcp", description="dhcp, off, or {address, gateway, dns}")
    ipv6: IPv6Config = Field("off", description="ra (SLAAC/router advertisements), off, or {address, gateway}")
    mtu: int | None = Field(None, ge=576, le=9216, description="link MTU; default: the driver's")
    offload: Offload = Field(default_factory=Offload, description="NIC offloads applied at every link-up")


class Interfaces(Strict):
    uplink: NetInterface | None = Field(None, description="the NIC towards the internet; peers connect here")
    lan: NetInterface | None = Field(None, description="the NIC on the LAN a subnet router serves")


class Peer(Strict):
    name: Name = Field(description="peer name, unique in this profile")
    public_key: WireGuardKey = Field(description="the peer's WireGuard public key")
    allowed_ips: list[Network] = Field(
        min_length=1, description="tunnel addresses (and networks) of this peer, e.g. 100.64.0.2/32")
    endpoint: HostPort | None = Field(None, description="host:port where the appliance can reach the peer")
    persistent_keepalive: int | None = Field(
        None, ge=0, le=65535, description="keepalive interval in seconds; 0 or unset: off")
    preshared_key: bool = Field(
        False, description="add a preshared key (post-quantum margin); generated in the secret store")


class WireGuard(Strict):
    listen_port: Port = Field(51820, description="UDP port WireGuard listens on")
    addresses: list[Interface] = Field(
        min_length=1, description="the appliance's tunnel addresses, e.g. 100.64.0.1/32 and fd7a:115c:a1e0::1/128")
    mtu: int = Field(1420, ge=1280, le=9000, description="tunnel MTU (1420 fits a 1500-byte uplink over IPv6)")
    endpoint: HostPort | None = Field(
        None, description="public host:port peers use to reach this appliance (written into peer configs)")
    peers: list[Peer] = Field(default_factory=list, description="the WireGuard peers")


class KernelDataplane(Strict):
    mode: Literal["kernel"] = Field("kernel", description="the kernel routes at layer 3: every IP protocol passes")
    wireguard: Literal["kernel", "wireguard-go"] = Field(
        "kernel", description="kernel module, or wireguard-go on a TUN with TSO/GRO offloads")


class UserspaceDataplane(Strict):
    mode: Literal["userspace"] = Field(
        description="rootless: TCP/UDP terminated and re-originated, ICMP echo answered; other protocols do not pass")
    wireguard: Literal["kernel", "wireguard-go"] = Field(
        "wireguard-go", description="always wireguard-go (unprivileged) in userspace mode")
    @property
    def socks5_address(self) -> tuple[IPAddress, int]:
        host, port = split_host_port(self.socks5)
        return ipaddress.ip_address(host), port

    socks5: ListenAddress = Field(
        "127.0.0.1:1080",
        description="where the SOCKS5 proxy into the tunnel listens: loopback for the appliance's own programs, or "
                    "a static address of the lan or uplink (then only with a password, from the secret store, "
                    "and opened in the firewall on that interface only); it reaches peers, nothing else")


Dataplane = Annotated[KernelDataplane | UserspaceDataplane, Field(discriminator="mode")]


class Routing(Strict):
    table: int = Field(52, ge=1, le=2**31 - 1, description="policy routing table for routes to peers")
    rule_priority: int = Field(5270, ge=1, le=32765, description="priority of the `ip rule` that looks up the table")
    advertise_routes: list[Network] = Field(
        default_factory=list, description="networks behind this appliance offered to peers (subnet router)")
    snat: bool = Field(True, description="masquerade peer traffic leaving the uplink/LAN to the appliance's address "
                                         "(kernel mode; userspace mode always re-originates flows from it); "
                                         "false: the networks behind must route the tunnel back via the appliance")
    nat66: bool | None = Field(
        None, description="masquerade peers' IPv6 traffic (NAT66, kernel mode); default: as snat when the tunnel's "
                          "IPv6 addresses are ULAs (fc00::/7), off (routed) when the tunnel prefix is globally routed")
    mss_clamp: bool = Field(True, description="clamp TCP MSS of forwarded SYNs (IPv4 and IPv6) to the path MTU")

    @field_validator("table")
    @classmethod
    def _not_reserved(cls, value: int) -> int:
        if value in RESERVED_TABLES:
            raise ValueError(f"table {value} is the kernel's '{RESERVED_TABLES[value]}' table: pick another, e.g. 52")
        return value


def _peer_or_any(value: Any) -> str:
    return "*" if value == "*" else check_name(value)


AclPeer = Annotated[str, PlainValidator(_peer_or_any), WithJsonSchema({"type": "string"})]


class AclRule(Strict):
    peers: list[AclPeer] = Field(min_length=1, description="peer names, or '*' for every peer")
    to: list[AclDestination] = Field(min_length=1, description="destinations: CIDR[:ports]")
    proto: Literal["tcp", "udp", "icmp", "any"] = Field("any", description="protocol; ports need tcp or udp")


class Firewall(Strict):
    shields_up: bool = Field(False, description="peers may not open connections to the appliance itself")
    block_local_networks: bool = Field(
        False, description="exit node: the way to everywhere leaves out private, CGNAT, link-local and ULA networks "
                           "(the uplink's LAN, 169.254.169.254); advertised routes and ACL rules naming such a "
                           "network still pass")
    acl: list[AclRule] = Field(
        default_factory=list,
        description="forwarding allowed from peers; empty: peers reach everything the roles offer")


class Dns(Strict):
    serve: bool = Field(
        True, description="answer DNS for peers on the appliance's tunnel address(es) (systemd-resolved); "
                          "`appliance peer` then writes DNS = that address")
    lan: bool = Field(False, description="also answer on the LAN address (subnet routers)")
    upstreams: list[Address] = Field(
        default_factory=list, description="resolvers to forward to; empty: the uplink's (DHCP or its ipv4.dns)")
    domains: list[DomainName] = Field(
        default_factory=list, description="split DNS: names in these domains (e.g. corp.example) are asked of "
                                          "lan_resolvers, all others of the upstreams")
    lan_resolvers: list[Address] = Field(
        default_factory=list, description="the LAN's resolvers for `domains`, e.g. 192.168.10.53")


class Metrics(Strict):
    listen_on: list[Literal["tunnel", "lan"]] = Field(
        default_factory=list, description="where the Prometheus endpoint listens (and the firewall opens it): the "
                                          "tunnel address, the LAN's static address; empty: no endpoint")
    port: Port = Field(9586, description="its TCP port")


class Health(Strict):
    grace: int = Field(120, ge=10, le=3600, description="seconds after boot in which the firewall, the uplink "
                                                          "(address, default route), the tunnel (port, peers) and "
                                                          "sshd must be up for the boot to count as healthy")
    handshake_with: list[Name] = Field(
        default_factory=list, description="peers of which one must complete a handshake for a healthy boot "
                                          "(devices that dial out); empty: no handshake needed")
    within: int = Field(60, ge=10, le=3600, description="seconds for that handshake")


class Profile(Strict):
    name: Name = Field(description="hostname and image name")
    roles: list[Role] = Field(min_length=1, description="exit-node and/or subnet-router")
    system: System = Field(default_factory=System, description="operating system settings")
    interfaces: Interfaces = Field(description="network interfaces")
    wireguard: WireGuard = Field(description="the WireGuard interface and its peers")
    dataplane: Dataplane = Field(default_factory=KernelDataplane, description="how packets are forwarded")
    routing: Routing = Field(default_factory=Routing, description="policy routing, SNAT and MSS clamping")
    firewall: Firewall = Field(default_factory=Firewall, description="forwarding ACLs and shields-up")
    dns: Dns = Field(default_factory=Dns, description="a resolver for peers (never on the uplink)")
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus metrics (never on the uplink)")
    health: Health = Field(default_factory=Health, description="what a healthy boot is (appliance-health.service, "
                                                               "required by boot-complete.target)")

    @property
    def is_exit_node(self) -> bool:
        return "exit-node" in self.roles

    @property
    def is_subnet_router(self) -> bool:
        return "subnet-router" in self.roles

    @property
    def userspace(self) -> bool:
        """The rootless dataplane (appliance-netstack)."""
        return isinstance(self.dataplane, UserspaceDataplane)

    @property
    def kernel_mode(self) -> bool:
        """The kernel routes at layer 3 (with its WireGuard module or wireguard-go on a TUN)."""
        return isinstance(self.dataplane, KernelDataplane)

    @property
    def kernel_wireguard(self) -> bool:
        """The kernel's own WireGuard, which networkd creates from a .netdev."""
        return self.kernel_mode and self.dataplane.wireguard == "kernel"

    @property
    def wireguard_go_tun(self) -> bool:
        """Kernel mode with wireguard-go on a TUN device, its own unit."""
        return self.kernel_mode and self.dataplane.wireguard == "wireguard-go"

    @property
    def masquerade_families(self) -> frozenset[int]:
        """The IP versions whose peer traffic kernel mode masquerades (routing.snat for IPv4,
        routing.nat66 for IPv6). Userspace mode re-originates every flow from its own sockets."""
        r = self.routing
        ula = ipaddress.ip_network("fc00::/7")
        nat66 = r.nat66 if r.nat66 is not None else r.snat and all(
            a.ip in ula for a in self.wireguard.addresses if a.version == 6)
        return frozenset(v for v, on in ((4, r.snat), (6, nat66)) if on)

    def links(self) -> list[tuple[str, NetInterface]]:
        """The NICs the profile declares, by role, uplink first."""
        return [(role, iface) for role, iface in (("uplink", self.interfaces.uplink), ("lan", self.interfaces.lan))
                if iface is not None]

    def link_with_address(self, ip: IPAddress) -> str | None:
        """The role of the NIC whose static address ip is, if one is."""
        for role, iface in self.links():
            for cfg in (iface.ipv4, iface.ipv6):
                if isinstance(cfg, StaticIPv4 | StaticIPv6) and cfg.address.ip == ip:
                    return role
        return None
