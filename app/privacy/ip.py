"""IP addresses: which ones identify someone (the policy in :mod:`app.privacy`'s docstring), and the
IPv6 scanner. IPv4 addresses are found with the other number shapes (:mod:`app.privacy.numbers`),
which asks :func:`ipv4_kept` about each one.
"""

from __future__ import annotations

import ipaddress
import re

from app.privacy.candidates import P_PII, Candidate

__all__ = ["ipv4_kept", "scan_ipv6"]

# A dotted quad right after these is a version (``torch==2.13.0.1``, ``version 1.0.0.2``). Not
# after "@": ``deploy@10.1.2.3`` is a login on a host.
_VERSION_CONTEXT_RE = re.compile(r"(?i)(?:[=<>!~]=|version\w*|release|build|section)[\s\"':=(]*\Z")

# Reserved for documentation (RFC 5737, RFC 3849): example addresses identify nobody.
_DOC_NETS = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
_CIDR_RE = re.compile(r"/(\d{1,3})(?!\d)")


def _identifying(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address can point at someone's machine: not loopback, unspecified, multicast,
    reserved, link-local (unless its interface id is a MAC address), a net or host mask, or a
    documentation example."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _identifying(ip.ipv4_mapped)
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local and _eui64(ip):
        return True  # its interface id is the machine's MAC address (fe80::1ff:fe23:4567:890a)
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip.is_link_local:
        return False
    bits, ones = int(ip), (1 << ip.max_prefixlen) - 1
    if any(v & (v + 1) == 0 for v in (bits, bits ^ ones)):
        return False  # 255.255.255.0, 0.0.0.255
    return not any(ip.version == net.version and ip in net for net in _DOC_NETS)


def _eui64(ip: ipaddress.IPv6Address) -> bool:
    """An interface id made from a MAC address (modified EUI-64): ``ff:fe`` in its middle."""
    return ip.packed[11:13] == b"\xff\xfe"


def _network(text: str, end: int, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """``10.0.0.0/8``: a network (host bits zero) names a range, not anyone's host."""
    m = _CIDR_RE.match(text, end)
    if m is None or int(m.group(1)) > ip.max_prefixlen:
        return False
    try:
        ipaddress.ip_network(f"{ip}/{m.group(1)}", strict=True)
    except ValueError:
        return False
    return True


def ipv4_kept(text: str, start: int, end: int) -> bool:
    """True for an address this filter keeps (see the module docstring), or not an address."""
    octets = [int(o) for o in text[start:end].split(".")]
    if max(octets) > 255 or text[start] == "0":
        return True
    if text.startswith(".in-addr.arpa", end):  # reverse DNS: the octets are backwards
        octets.reverse()
    ip = ipaddress.IPv4Address(".".join(map(str, octets)))
    if not _identifying(ip) or _network(text, end, ip):
        return True
    # Three one-digit parts first: a version or section number (2.7.2.2, 8.2.4.44) or a public
    # resolver (1.1.1.1, 8.8.8.8), never a person. Digits counting up (123.45.67.89): an example.
    if max(octets[:3]) < 10 or "".join(map(str, octets)) in "0123456789":
        return True
    return _VERSION_CONTEXT_RE.search(text, max(0, start - 24), start) is not None


# --- IPv6 -------------------------------------------------------------------------------------

# Hints are cheap (anchored on ":"): "::" or a short hex group between two colons. Each hint is
# widened to a candidate, which ``ipaddress`` then validates.
_V6_HINT_RE = re.compile(r":[0-9A-Fa-f]{0,4}:")
_V6_BODY_RE = re.compile(
    r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%[\w.\-]{1,16})?(?![\w:]|\.\d)"
)
_HEX_COLON = frozenset("0123456789abcdefABCDEF:")


def scan_ipv6(text: str, ascii_view: bytes, out: list[Candidate]) -> None:
    done = 0
    for h in _V6_HINT_RE.finditer(text):
        start = h.start()
        if start < done:
            continue
        stop = max(0, start - 40)
        while start > stop and text[start - 1] in _HEX_COLON:
            start -= 1
        # Inside a word: ``std::vector``, ``Foo::bar``, ``T10:30:00``.
        if start and (text[start - 1].isalnum() or text[start - 1] in "_.:"):
            continue
        m = _V6_BODY_RE.match(text, start)
        if m is None:
            continue
        done = m.end()
        value = m.group()
        try:
            addr = ipaddress.IPv6Address(value)
        except ValueError:
            continue  # a time (12:30:45), a slice (a[1:2:3]), a MAC address
        if not _identifying(addr) or _network(text, m.end(), addr):
            continue
        groups = [g for g in value.split("%")[0].split(":") if g]
        # Two short groups around "::" is a Python slice (``a[1::2]``) or a C++/Rust path
        # (``a::b``) far more often than an address; real ones (``2a00::1``) have a longer group
        # and a digit.
        if len(groups) <= 2 and (max(map(len, groups)) < 3 or not any(c.isdigit() for c in value)):
            continue
        out.append((m.start(), m.end(), P_PII, "ipv6"))
