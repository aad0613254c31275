"""Host names as the portal check and the verifier compare them. Standard library only."""

from __future__ import annotations

from urllib.parse import urlsplit


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
