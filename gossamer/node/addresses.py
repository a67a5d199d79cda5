"""Parsing and checking of multiaddrs and host:port strings, with clear errors."""

from __future__ import annotations

import ipaddress

from gossamer.node.errors import ConfigError


def parse_multiaddr(text: str, *, what: str = "address", need_peer_id: bool = False):
    """Parse ``text`` as a multiaddr (``multiaddr.Multiaddr``) or raise ConfigError."""
    import multiaddr

    try:
        addr = multiaddr.Multiaddr(text)
    except Exception as exc:  # the multiaddr package raises several unrelated types
        raise ConfigError(f"{what} {text!r} is not a multiaddr: {exc}") from exc
    if need_peer_id and peer_id_of(addr) is None:
        raise ConfigError(f"{what} {text!r} must end in /p2p/<peer id>")
    return addr


def peer_id_of(addr) -> str | None:
    """The ``/p2p/<id>`` component of a multiaddr, if any."""
    try:
        return addr.value_for_protocol("p2p")
    except Exception:  # absent component raises ProtocolLookupError in some versions
        return None


def tcp_endpoint(addr) -> tuple[str, int] | None:
    """(ip, port) of an ``/ip4|ip6/.../tcp/...`` multiaddr, or None."""
    host = None
    for proto in ("ip4", "ip6"):
        try:
            host = addr.value_for_protocol(proto)
        except Exception:
            host = None
        if host:
            break
    try:
        port = addr.value_for_protocol("tcp")
    except Exception:
        port = None
    if not host or port is None:
        return None
    return str(host), int(port)


def is_relayed(addr) -> bool:
    return "/p2p-circuit" in str(addr)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def parse_host_port(text: str, *, what: str = "address") -> tuple[str, int]:
    """Parse ``host:port`` (``[v6]:port`` for IPv6) or raise ConfigError."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what} {text!r} must look like HOST:PORT")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r} has a non-numeric port") from exc
    if not 0 <= port < 65536:
        raise ConfigError(f"{what} {text!r} has a port outside 0-65535")
    return host, port
