"""Relay and relayed addresses (pure): parsing, scoping and choosing what to advertise.

A relayed address is ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>``;
the relay's own transport addresses are plain TCP multiaddrs without the
``/p2p`` suffix.
"""

from __future__ import annotations

from collections.abc import Iterable

from gossamer.node.reachability import is_public_ip

MAX_RELAY_ADDRS = 8  # per relay: in reservations, candidates and exchange answers


def circuit_addr(relay_addr: str, relay_id: str, peer_id: str) -> str:
    """``<relay transport addr>/p2p/<relay>/p2p-circuit/p2p/<peer>``.

    Defect (not in the notes): ``BasicHost.get_addrs()`` strips "the" /p2p/
    component of each address before appending ours, but looks up the
    *first* one: a relayed address loses everything from the relay's id on
    and becomes ``<relay addr>/p2p/<us>`` -- the relay's address under our id.
    So relayed addresses are appended by the node, never fed to the host.
    """
    return f"{relay_addr}/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}"


def parse_circuit(addr: str) -> tuple[str, str, str] | None:
    """``(relay transport addr, relay id, target id)`` of a relayed address, or None."""
    head, sep, tail = addr.partition("/p2p-circuit")
    if not sep or not tail.startswith("/p2p/"):
        return None
    target = tail[len("/p2p/") :].split("/")[0]
    relay_addr, p2p, relay_id = head.rpartition("/p2p/")
    if not p2p or not relay_id or not target or "/" in relay_id:
        return None
    return relay_addr, relay_id, target


def target_peer(addr: str) -> str | None:
    """The peer an address leads to: the last ``/p2p/<id>`` component."""
    _, sep, rest = addr.rpartition("/p2p/")
    return rest.split("/")[0] if sep and rest else None


def usable_relay_addr(addr: str, scope: str = "public") -> bool:
    """A relay transport address worth advertising (pure).

    TCP at a public IP; with ``scope`` = ``"loopback"`` or ``"lan"`` (we reach
    the relay itself at such an address) also addresses of that scope, so
    relays work on one machine or one LAN too.
    """
    parts = addr.split("/")
    if (
        len(parts) < 5
        or parts[1] not in ("ip4", "ip6")
        or parts[3] != "tcp"
        or "/p2p-circuit" in addr
    ):
        return False
    return ip_scope(parts[2]) in ("public", scope)


def ip_scope(ip: str) -> str:
    """``public``, ``loopback``, ``lan`` or ``none`` (unspecified, malformed)."""
    if is_public_ip(ip):
        return "public"
    if ip.startswith("127.") or ip == "::1":
        return "loopback"
    if ip in ("0.0.0.0", "::") or (":" not in ip and ip.count(".") != 3):
        return "none"
    return "lan"


def tcp_addr(addr: str) -> bool:
    """A dialable-looking TCP multiaddr (any scope but unspecified)."""
    parts = addr.split("/")
    return (
        len(parts) >= 5
        and parts[1] in ("ip4", "ip6")
        and parts[3] == "tcp"
        and ip_scope(parts[2]) != "none"
        and "/p2p-circuit" not in addr
    )


def decode_relay_addrs(raw: Iterable[bytes], relay_id: str) -> list[str]:
    """The TCP transport addresses a relay offered in its reservation answer."""
    import multiaddr

    out = []
    for item in list(raw)[:MAX_RELAY_ADDRS]:
        try:
            text = str(multiaddr.Multiaddr(item))
        except Exception:  # malformed bytes from the relay
            continue
        if "/p2p/" in text:
            text, _, pid = text.rpartition("/p2p/")
            if pid != relay_id:
                continue
        if tcp_addr(text) and text not in out:
            out.append(text)
    return out


def substitute_unspecified(addr: str, remote: tuple[str, int] | None) -> str:
    """``addr`` without ``/p2p``, an unspecified IP replaced by the one we see the peer at."""
    parts = addr.split("/")
    if remote is not None and len(parts) >= 3 and parts[2] in ("0.0.0.0", "::"):
        parts[2] = remote[0]
    return "/".join(parts).rpartition("/p2p/")[0] if "/p2p/" in addr else "/".join(parts)
