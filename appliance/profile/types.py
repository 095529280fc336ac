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

from pydantic import BeforeValidator, Field, PlainSerializer, PlainValidator, WithJsonSchema

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Every pattern is applied with fullmatch: `$` would also match before a trailing newline, which
# would then land in the file the value is rendered into.
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# A hostname (RFC 1123 labels) as WireGuard endpoints may name one.
_HOSTNAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?", re.ASCII)
_HOST_PORT_RE = re.compile(r"(\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\[\]:]+)):(?P<port>[0-9]{1,5})", re.ASCII)
# Interface names as the kernel allows them (at most 15 bytes, no '/', whitespace, quotes or ':'),
# narrowed to what networkd's Name=, udev's NAME== and sysctl.d read literally, plus the glob
# characters * ? [ ] that networkd and udev both understand.
IFNAME_MAX = 15
_IFNAME_RE = re.compile(r"[A-Za-z0-9_*?\[][A-Za-z0-9_.*?\[\]-]{0,14}", re.ASCII)
_TIMEZONE_RE = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*", re.ASCII)
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_SSH_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
# Curve25519's field prime: a public key is a little-endian number below it (the top bit ignored)
_P25519 = 2**255 - 19


def _require_str(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected {what}")
    return str(value).strip()


def _require_text(value: Any, what: str) -> str:
    """A YAML string, taken as written: no numbers, no surrounding whitespace, no control characters."""
    if not isinstance(value, str):
        raise ValueError(f"expected {what}")
    if _CONTROL_RE.search(value):
        raise ValueError(f"expected {what}: control characters and line breaks are not allowed")
    return value


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
    """A WireGuard (Curve25519) public key: standard base64 of exactly 32 bytes, 44 characters, that
    names a point a handshake can use (canonical, not of small order)."""
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
    if base64.b64encode(raw).decode() != text:
        raise ValueError("not the canonical base64 of a key: copy it as `wg pubkey` prints it")
    if int.from_bytes(raw, "little") & ~(1 << 255) >= _P25519:
        raise ValueError("not a Curve25519 public key (a non-canonical encoding): `wg pubkey` never prints it")
    if _small_order(raw):
        raise ValueError("a point of small order, not a usable Curve25519 public key: no handshake can succeed")
    return text


def _small_order(raw: bytes) -> bool:
    """A low-order point gives an all-zero shared secret whatever the private key: cryptography refuses it."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    try:
        X25519PrivateKey.from_private_bytes(bytes([9] * 32)).exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        return True
    return False


def check_name(value: Any) -> str:
    """A hostname label. Names become file names (secret store, images), so this is also their guard."""
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(
            "expected a hostname label: lowercase letters, digits and '-', 1 to 63 characters, "
            "not starting or ending with '-'"
        )
    return value


def check_package(value: Any) -> str:
    if not isinstance(value, str) or not _PACKAGE_RE.fullmatch(value):
        raise ValueError("expected a Debian package name (lowercase letters, digits, '+', '-', '.')")
    return value


# a kernel module's name as modprobe takes it: the file name without .ko (kmod treats - and _ alike)
_MODULE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,55}")


def check_module(value: Any) -> str:
    if not isinstance(value, str) or not _MODULE_RE.fullmatch(value):
        raise ValueError("expected a kernel module name as modprobe takes it (lowercase letters, digits, '_', '-'), "
                         "e.g. iwlwifi")
    return value


def check_mac(value: Any) -> str:
    text = _require_str(value, "a MAC address such as 52:54:00:12:34:56").lower().replace("-", ":")
    if not _MAC_RE.fullmatch(text):
        raise ValueError("expected a MAC address such as 52:54:00:12:34:56")
    return text


def check_interface_name(value: Any) -> str:
    """A NIC's name or a glob of names, as networkd's Name= and udev's NAME== read it."""
    text = _require_text(value, "an interface name or glob such as enp1s0 or en*")
    if len(text.encode()) > IFNAME_MAX:
        raise ValueError(f"an interface name has at most {IFNAME_MAX} characters (the kernel's limit)")
    if not _IFNAME_RE.fullmatch(text) or text in (".", ".."):
        raise ValueError("expected an interface name or glob such as enp1s0, eth0.10 or en*: letters, digits, "
                         "'_', '-', '.', and the glob characters * ? [ ]")
    return text


def check_timezone_name(value: Any) -> str:
    text = _require_text(value, "an IANA time zone such as UTC or Europe/Amsterdam")
    if not _TIMEZONE_RE.fullmatch(text):
        raise ValueError("expected an IANA time zone such as UTC or Europe/Amsterdam")
    return text


def check_ssh_public_key(value: Any) -> str:
    text = _require_text(value, "an OpenSSH public key line such as 'ssh-ed25519 AAAAC3... user@host'")
    parts = text.split()
    if len(parts) < 2 or parts[0] not in _SSH_KEY_TYPES:
        raise ValueError(
            "expected an OpenSSH public key line such as 'ssh-ed25519 AAAAC3... user@host' "
            "(the contents of ~/.ssh/id_ed25519.pub)"
        )
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key part of this SSH public key is not valid base64") from None
    problem = ssh_key_problem(parts[0], blob)
    if problem:
        raise ValueError(f"not a valid {parts[0]} key: {problem}")
    return " ".join(parts)


def _ssh_strings(blob: bytes) -> list[bytes]:
    """The length-prefixed fields of an SSH wire-format key (RFC 4253 6.6)."""
    fields, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise ValueError("truncated")
        n = int.from_bytes(blob[pos:pos + 4], "big")
        if pos + 4 + n > len(blob):
            raise ValueError("truncated")
        fields.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return fields


def ssh_key_problem(kind: str, blob: bytes) -> str | None:
    """What is wrong with an SSH public key's blob, or None: its fields must be a key of its type."""
    try:
        fields = _ssh_strings(blob)
    except ValueError as e:
        return str(e)
    if not fields or fields[0] != kind.encode():
        return "the encoded key is of another type than the line says"
    if kind.startswith("sk-"):
        # security keys: FIDO application string after the key; cryptography does not load these
        if kind == "sk-ssh-ed25519@openssh.com":
            ok = len(fields) == 3 and len(fields[1]) == 32
        else:
            ok = len(fields) == 4 and fields[1] == b"nistp256" and len(fields[2]) == 65 and fields[2][0] == 4
        return None if ok and fields[-1].startswith(b"ssh:") else "not a security-key public key"
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    try:
        load_ssh_public_key(f"{kind} {base64.b64encode(blob).decode()}".encode())
    except (ValueError, TypeError) as e:
        return str(e).rstrip(".") or "cannot be loaded"
    except Exception:  # cryptography's unsupported-algorithm and backend errors
        return "cannot be loaded"
    return None


def check_domain(value: Any) -> str:
    """A DNS domain as resolved's Domains= and the lab's resolvers read it: RFC 1123 labels, lower case."""
    text = _require_text(value, "a DNS domain such as corp.example")
    if not _HOSTNAME_RE.fullmatch(text) or text.endswith(".") or "." not in text:
        raise ValueError("expected a DNS domain such as corp.example: labels of letters, digits and '-' "
                         "separated by '.'")
    return text.lower()


def split_host_port(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (already validated) -> (host without brackets, port)."""
    host, _, port = text.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def parse_host_port(value: Any) -> str:
    """host:port or [v6]:port, the form WireGuard endpoints and listen addresses use."""
    text = _require_str(value, "host:port such as vpn.example.net:51820 or [2001:db8::1]:51820")
    m = _HOST_PORT_RE.fullmatch(text)
    if not m:
        raise ValueError("expected host:port such as vpn.example.net:51820 or [2001:db8::1]:51820")
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    if m.group("v6"):
        address = parse_address(m.group("v6"))
        if address.version != 6:
            raise ValueError("brackets are for IPv6 addresses: write an IPv4 address without them")
    elif not _is_ipv4(m.group("host")) and not _HOSTNAME_RE.fullmatch(m.group("host")):
        raise ValueError(f"'{m.group('host')[:40]}' is neither an IP address nor a host name "
                         "(letters, digits, '-' and '.')")
    return text


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def parse_listen_address(value: Any) -> str:
    """address:port or [v6]:port with an IP literal: what a socket binds to (no name to resolve)."""
    text = parse_host_port(value)
    host, _ = split_host_port(text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address to listen on, not the name '{host[:40]}': "
                         "e.g. 127.0.0.1:1080 or [::1]:1080") from None
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
    str, PlainValidator(check_name),
    _string_schema("hostname label", "exit-ams-1", r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"),
]
PackageName = Annotated[str, PlainValidator(check_package), _string_schema("Debian package name", "tcpdump")]
ModuleName = Annotated[str, PlainValidator(check_module), _string_schema("kernel module name", "iwlwifi")]
MacAddress = Annotated[
    str, BeforeValidator(check_mac), _string_schema("MAC address", "52:54:00:12:34:56")
]
SshPublicKey = Annotated[
    str, PlainValidator(check_ssh_public_key),
    _string_schema("OpenSSH public key line", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... admin@laptop"),
]
HostPort = Annotated[
    str, PlainValidator(parse_host_port), _string_schema("host:port", "vpn.example.net:51820")
]
Port = Annotated[int, Field(ge=1, le=65535)]
ListenAddress = Annotated[
    str, PlainValidator(parse_listen_address), _string_schema("IP address:port to listen on", "127.0.0.1:1080")
]
InterfaceName = Annotated[
    str, PlainValidator(check_interface_name),
    _string_schema("interface name or glob (at most 15 characters)", "enp1s0",
                   r"^[A-Za-z0-9_*?\[][A-Za-z0-9_.*?\[\]-]{0,14}$"),
]
TimezoneName = Annotated[
    str, PlainValidator(check_timezone_name), _string_schema("IANA time zone", "Europe/Amsterdam")
]
DomainName = Annotated[str, PlainValidator(check_domain), _string_schema("DNS domain", "corp.example")]
