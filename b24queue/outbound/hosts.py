"""Host names and addresses, as the install call-back, the token verifier and the portal
client compare and judge them. Standard library only."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

# IPv6 prefixes that carry an IPv4 address in their last 32 bits (RFC 6052 NAT64, the deprecated
# IPv4-compatible form); IPv4-mapped and 6to4 have `ipaddress` properties of their own.
_EMBEDS_IPV4 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::/96"))
# RFC 8215 local-use NAT64: where the IPv4 sits depends on the operator's prefix length, and it
# is never a public portal.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def normalise_host(host: str) -> str | None:
    """The host's IDNA (punycode, lower-case) form, or None if it is not a domain name we can
    normalise (empty, a label too long, broken punycode): such a host is refused, not guessed."""
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
        ascii_host.encode("ascii").decode("idna")  # the round trip rejects broken `xn--` labels
    except UnicodeError:
        return None
    return ascii_host or None


def same_host(a: str, b: str) -> bool:
    """`пример.bitrix24.ru` and `xn--e1afmkfd.bitrix24.ru` are one host; a `:port` counts."""
    host_a, _, port_a = a.partition(":")
    host_b, _, port_b = b.partition(":")
    norm_a, norm_b = normalise_host(host_a), normalise_host(host_b)
    return norm_a is not None and norm_a == norm_b and port_a == port_b


def url_host(url: str) -> str | None:
    """The host (and :port, if any) of a URL, or None if it has none or does not parse."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        port = parts.port
    except ValueError:  # an unbalanced '[', a port that is not a number
        return None
    if not hostname:
        return None
    return f"{hostname}:{port}" if port is not None else hostname


def is_ip_literal(host: str) -> bool:
    """Any spelling of an address: `1.2.3.4`, `::1`, and what inet_aton still takes (`127.1`,
    `0x7f000001`, `2130706433`), which a resolver would turn into an address."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def carried_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address an IPv6 one carries (IPv4-mapped, NAT64, 6to4, IPv4-compatible): that is
    where the packets end up, so that is the address to judge. Any other address is itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if any(ip in net for net in _EMBEDS_IPV4):
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def is_public_address(host: str) -> bool:
    """True for an address a public portal may have; False for private, loopback, link-local,
    multicast, reserved ones, also when wrapped in IPv6, and for anything not an address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip in _LOCAL_NAT64:
        return False
    ip = carried_address(ip)
    return ip.is_global and not ip.is_multicast
