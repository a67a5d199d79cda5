"""Connection admission that one address cannot monopolise (pure: no sockets, clock injected).

Two moments decide:

* **Before the handshake** (:meth:`Admission.begin_handshake`): an inbound TCP connection costs
  a Noise handshake and a task until it completes or times out.  Half-open connections are
  capped per IP, per subnet (/24 for IPv4, /64 for IPv6) and in all, so a flood from one
  address (or one subnet) fills its own allowance and nobody else's.  An address that already
  holds its ``connections_per_ip`` gets one handshake per ``full_ip_handshake_every`` seconds:
  each of its handshakes would be refused after it completed (unless it is a peer we need,
  whom only the handshake can name), and a host that redials at once must not make us pay a
  Noise handshake per redial.
* **After it** (:meth:`Admission.on_connected`): established connections are capped per IP; and
  when the node is full, a newcomer may take the slot of the connection that has been idle the
  longest — never one we need (bootstrap peers, our relays, members of our runs: *protected*),
  and only if that one has been idle for ``evict_idle_after`` seconds, so churning newcomers
  cannot push out peers that are in use.

Loopback addresses are exempt unless ``exempt_loopback`` is off: test swarms and benches run
hundreds of nodes on 127.0.0.1, and a cap meant for strangers must not trip them by accident.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionLimits:
    handshakes_per_ip: int = 8
    handshakes_per_subnet: int = 32
    handshakes_total: int = 128
    connections_per_ip: int = 32
    max_connections: int = 256
    evict_idle_after: float = 30.0
    full_ip_handshake_every: float = 1.0
    exempt_loopback: bool = True


def subnet_of(ip: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) an address belongs to; the address itself if unparsable."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def is_loopback(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Decision:
    """What to do with a connection that just completed its handshake."""

    admit: bool
    evict: str | None = None  # a peer whose connection to close to make room
    reason: str = ""


class Admission:
    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._pending_ip: Counter[str] = Counter()
        self._pending_subnet: Counter[str] = Counter()
        self._pending = 0
        self._full_ip_tried: dict[str, float] = {}  # address at its cap -> its last handshake
        self.refused: Counter[str] = Counter()  # reason code -> count
        self.evicted = 0  # idle connections closed to make room for a newcomer

    # ------------------------------------------------------------ handshakes

    def begin_handshake(
        self, ip: str | None, *, connections_from_ip: int = 0, now: float = 0.0
    ) -> str | None:
        """Count an inbound handshake from ``ip``; a refusal reason if it must be dropped
        (then nothing is counted).  Call :meth:`end_handshake` when it ends, either way.

        ``connections_from_ip``: the established connections ``ip`` holds now; ``now``: a
        monotonic clock, for the handshake rate of an address at its cap."""
        limits = self.limits
        if ip is not None and limits.exempt_loopback and is_loopback(ip):
            ip = None  # counted in the total only
        if self._pending >= limits.handshakes_total:
            return self._refuse("handshakes_total", f"{self._pending} handshakes in progress")
        if ip is not None:
            if self._pending_ip[ip] >= limits.handshakes_per_ip:
                return self._refuse("handshakes_per_ip", f"{ip} has handshakes in progress")
            subnet = subnet_of(ip)
            if self._pending_subnet[subnet] >= limits.handshakes_per_subnet:
                return self._refuse("handshakes_per_subnet", f"{subnet} has handshakes pending")
            if connections_from_ip >= limits.connections_per_ip:
                last = self._full_ip_tried.get(ip)
                if last is not None and now - last < limits.full_ip_handshake_every:
                    return self._refuse("full_ip_redial", f"{ip} is full and redialled")
                self._forget_old_full_ips(now)
                self._full_ip_tried[ip] = now
            self._pending_ip[ip] += 1
            self._pending_subnet[subnet] += 1
        self._pending += 1
        return None

    def _forget_old_full_ips(self, now: float) -> None:
        # at most max_connections / connections_per_ip addresses can be full at once; those
        # that have not redialled for a while are forgotten
        horizon = 10 * self.limits.full_ip_handshake_every
        for ip, last in list(self._full_ip_tried.items()):
            if now - last >= horizon:
                del self._full_ip_tried[ip]

    def end_handshake(self, ip: str | None) -> None:
        if ip is not None and self.limits.exempt_loopback and is_loopback(ip):
            ip = None
        self._pending = max(0, self._pending - 1)
        if ip is not None:
            _decrement(self._pending_ip, ip)
            _decrement(self._pending_subnet, subnet_of(ip))

    # ------------------------------------------------------- established ones

    def on_connected(
        self,
        ip: str | None,
        *,
        connections_from_ip: int,
        total: int,
        peer_id: str,
        idle_since: Mapping[str, float],
        protected_peers: Callable[[], Collection[str]],
        now: float,
    ) -> Decision:
        """Admit or refuse ``peer_id``'s new connection (counts include it); maybe evict another.

        ``idle_since``: each other connected peer's last activity (same clock as ``now``).
        ``protected_peers`` is asked only when a cap is reached (it reads every run's members).
        """
        limits = self.limits
        exempt = ip is None or (limits.exempt_loopback and is_loopback(ip))
        over_ip = not exempt and connections_from_ip > limits.connections_per_ip
        if not over_ip and total <= limits.max_connections:
            return Decision(True)
        protected_set = protected_peers()
        protected = peer_id in protected_set
        if over_ip and not protected:
            return Decision(False, reason=self._refuse("connections_per_ip", f"{ip} is full"))
        if total <= limits.max_connections:
            return Decision(True)
        idle = [
            (since, peer)
            for peer, since in idle_since.items()
            if peer not in protected_set and now - since >= limits.evict_idle_after
        ]
        if idle:
            _, victim = min(idle)
            self.evicted += 1
            return Decision(True, evict=victim, reason="evicted the idlest connection")
        if protected:
            return Decision(True, reason="over the cap for a protected peer")
        return Decision(False, reason=self._refuse("full", f"{total - 1} connections, none idle"))

    def _refuse(self, code: str, reason: str) -> str:
        self.refused[code] += 1
        return reason


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


__all__ = ["Admission", "AdmissionLimits", "Decision", "is_loopback", "subnet_of"]
