"""Constrained scalar types used by the profile model.

Each validator raises ValueError with a message written for the person editing the YAML: it says
what was expected and, where we can guess, what they probably meant.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer, PlainValidator, WithJsonSchema

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def _require_str(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected {what}")
    return str(value).strip()


def parse_network(value: Any) -> IPNetwork:
    """A network in CIDR notation whose host bits are zero (the way routes are written)."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    text = _require_str(value, "a network in CIDR notation such as 192.168.10.0/24")
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as strict_error:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(
                f"expected a network in CIDR notation such as 192.168.10.0/24 or fd00::/64 ({strict_error})"
            ) from None
        raise ValueError(f"host bits are set: a network is written {loose}") from None


def parse_interface(value: Any) -> IPInterface:
    """An address with its prefix length, as configured on an interface (10.0.0.1/24)."""
    if isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return value
    text = _require_str(value, "an address with a prefix length such as 100.64.0.1/32")
    if "/" not in text:
        raise ValueError("expected an address with a prefix length such as 100.64.0.1/32 (the /NN is missing)")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError as e:
        raise ValueError(f"expected an address with a prefix length such as 100.64.0.1/32 ({e})") from None
    if iface.ip == iface.network.network_address and iface.network.prefixlen < iface.max_prefixlen - 1:
        raise ValueError(f"{text} is the network address of {iface.network}: give the interface's own address")
    return iface


def parse_address(value: Any) -> IPAddress:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    text = _require_str(value, "an IP address such as 192.168.1.1")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError("expected an IP address such as 192.168.1.1 or fd00::1") from None


def check_wireguard_key(value: Any) -> str:
    """A WireGuard (Curve25519) key: standard base64 of exactly 32 bytes, 44 characters."""
    if not isinstance(value, str):
        raise ValueError("expected a WireGuard key: 44 characters of base64, as printed by `wg pubkey`")
    text = value.strip()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "not valid base64: a WireGuard key is 44 characters of base64 ending in '=', as printed by `wg pubkey`"
        ) from None
    if len(raw) != 32:
        raise ValueError(f"a WireGuard key decodes to 32 bytes, this one to {len(raw)}")
    if raw == bytes(32):
        raise ValueError("the all-zero key is not a usable Curve25519 public key")
    return text


def check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            "expected a hostname label: lowercase letters, digits and '-', 1 to 63 characters, "
            "not starting or ending with '-'"
        )
    return value


def check_package(value: str) -> str:
    if not _PACKAGE_RE.match(value):
        raise ValueError("expected a Debian package name (lowercase letters, digits, '+', '-', '.')")
    return value


def check_mac(value: Any) -> str:
    text = _require_str(value, "a MAC address such as 52:54:00:12:34:56").lower().replace("-", ":")
    if not _MAC_RE.match(text):
        raise ValueError("expected a MAC address such as 52:54:00:12:34:56")
    return text


def check_ssh_public_key(value: str) -> str:
    parts = value.split()
    if len(parts) < 2 or parts[0] not in _SSH_KEY_TYPES:
        raise ValueError(
            "expected an OpenSSH public key line such as 'ssh-ed25519 AAAAC3... user@host' "
            "(the contents of ~/.ssh/id_ed25519.pub)"
        )
    try:
        base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key part of this SSH public key is not valid base64") from None
    return " ".join(parts)


def parse_host_port(value: Any) -> str:
    """host:port or [v6]:port, the form WireGuard endpoints and listen addresses use."""
    text = _require_str(value, "host:port such as vpn.example.net:51820 or [2001:db8::1]:51820")
    m = re.match(r"^(\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d+)$", text)
    if not m:
        raise ValueError("expected host:port such as vpn.example.net:51820 or [2001:db8::1]:51820")
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    if m.group("v6"):
        parse_address(m.group("v6"))
    return text


def _string_schema(description: str, example: str, pattern: str | None = None) -> WithJsonSchema:
    schema: dict[str, Any] = {"type": "string", "description": description, "examples": [example]}
    if pattern:
        schema["pattern"] = pattern
    return WithJsonSchema(schema)


Network = Annotated[
    IPNetwork,
    PlainValidator(parse_network),
    PlainSerializer(str, return_type=str),
    _string_schema("network in CIDR notation, host bits zero", "192.168.10.0/24"),
]
Interface = Annotated[
    IPInterface,
    PlainValidator(parse_interface),
    PlainSerializer(str, return_type=str),
    _string_schema("address with prefix length", "100.64.0.1/32"),
]
Address = Annotated[
    IPAddress,
    PlainValidator(parse_address),
    PlainSerializer(str, return_type=str),
    _string_schema("IP address", "192.168.1.1"),
]
WireGuardKey = Annotated[
    str,
    PlainValidator(check_wireguard_key),
    _string_schema("WireGuard public key (base64, 32 bytes)", "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
                   r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"),
]
Name = Annotated[
    str, AfterValidator(check_name),
    _string_schema("hostname label", "exit-ams-1", r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
]
PackageName = Annotated[str, AfterValidator(check_package), _string_schema("Debian package name", "tcpdump")]
MacAddress = Annotated[
    str, BeforeValidator(check_mac), _string_schema("MAC address", "52:54:00:12:34:56")
]
SshPublicKey = Annotated[
    str, AfterValidator(check_ssh_public_key),
    _string_schema("OpenSSH public key line", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... admin@laptop"),
]
HostPort = Annotated[
    str, PlainValidator(parse_host_port), _string_schema("host:port", "vpn.example.net:51820")
]
Port = Annotated[int, Field(ge=1, le=65535)]
