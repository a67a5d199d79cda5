"""Reachability: can peers on the internet dial this node?  AutoNAT with a real dial-back.

A node asks a few connected peers ("helpers") to *dial it back*: the helper
opens a **fresh** TCP connection to the address it is asked to try and runs
the Noise handshake there, which succeeds only if the node listening at that
address holds the asking peer's key.  The existing connection is never used
(py-libp2p's AutoNAT v1 does exactly that and so rates every peer public:
LIBP2P-NOTES pitfall 5).

The RPC service ``autonat`` (``/gossamer/autonat/1.0.0``) has one method:

    dial_back(addrs: [multiaddr]) -> {"observed": "ip:port",
                                      "results": [{"addr", "ok", "error"}]}

Helper rules (so nobody can use a helper to dial a third party): the helper
dials only the IP it *observes* the caller at, on a direct connection (a
relayed caller is refused).  An address with a private, loopback or
unspecified IP is tried at the observed IP with the same port -- which is
exactly the question "does my NAT forward my listening port" (UPnP mapping,
static forward).  At most :data:`MAX_DIAL_BACK_ADDRS` addresses per call, one
call in flight per caller, :data:`MAX_CONCURRENT_DIAL_BACKS` in all.

The decision is pure (:func:`classify`) and kept apart from the I/O
(:class:`Reachability`):

* ``public``: ``k`` distinct helpers reached us at some address, where
  ``k = min(autonat_confirmations, helpers that answered or could answer)``;
* ``private``: ``k`` distinct helpers answered and none of them reached us;
* ``unknown``: fewer answers than that (no peers yet, helpers refusing).

Every verdict carries its evidence (which helper dialed what, and what
happened) for ``gossamer node status``.  Probes are re-run when the set of
addresses to verify changes (a listener, a UPnP mapping, a new observed IP),
every ``autonat_retry`` seconds while unknown, and every ``autonat_interval``
seconds once decided.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from gossamer.node.errors import GossamerError, Refused, RemoteError
from gossamer.node.rpc import CallContext, Service, rpc

if TYPE_CHECKING:
    from gossamer.node.node import Node

log = logging.getLogger(__name__)

PUBLIC = "public"
PRIVATE = "private"
UNKNOWN = "unknown"

MAX_DIAL_BACK_ADDRS = 4
MAX_CONCURRENT_DIAL_BACKS = 4
MAX_HELPERS_PER_ROUND = 3
MAX_EVIDENCE = 8


# ----------------------------------------------------------------- pure part


@dataclass(frozen=True)
class Probe:
    """One helper's attempt to dial us back at one address."""

    helper: str
    addr: str  # the /ip4/<ip>/tcp/<port> it dialed ("" when it refused outright)
    ok: bool
    error: str = ""
    observed: str = ""  # "ip:port" the helper sees our connection come from
    at: float = 0.0


@dataclass(frozen=True)
class Verdict:
    status: str  # PUBLIC | PRIVATE | UNKNOWN
    evidence: tuple[str, ...] = ()
    confirmed_addrs: tuple[str, ...] = ()  # addresses some helper reached us at
    observed_ips: tuple[str, ...] = ()  # our IPs as helpers see them, most seen first
    helpers: int = 0  # distinct helpers that answered
    since: float = field(default_factory=time.time)

    def same_as(self, other: Verdict) -> bool:
        return (self.status, self.confirmed_addrs, self.observed_ips) == (
            other.status,
            other.confirmed_addrs,
            other.observed_ips,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "evidence": list(self.evidence),
            "confirmed_addrs": list(self.confirmed_addrs),
            "observed_ips": list(self.observed_ips),
            "helpers": self.helpers,
            "for_s": round(time.time() - self.since, 1),  # how long the verdict has held
        }


def classify(
    probes: Iterable[Probe], *, needed: int, helpers_available: int, forced: str = "auto"
) -> Verdict:
    """Decide public / private / unknown from dial-back results (pure).

    ``needed``: autonat_confirmations; ``helpers_available``: how many distinct
    helpers could answer at all (connected, speaking autonat), so that a
    network with one other peer can still decide.
    """
    probes = list(probes)
    answered = {p.helper for p in probes if p.addr}
    reached = {p.helper for p in probes if p.ok}
    confirmed = tuple(sorted({p.addr for p in probes if p.ok}))
    ip_votes: dict[str, set[str]] = {}
    for p in probes:
        if p.observed:
            ip_votes.setdefault(p.observed.rpartition(":")[0], set()).add(p.helper)
    observed_ips = tuple(sorted(ip_votes, key=lambda ip: (-len(ip_votes[ip]), ip)))
    evidence = [_describe(p) for p in sorted(probes, key=lambda p: (not p.ok, -p.at))]
    if forced in (PUBLIC, PRIVATE):
        return Verdict(
            forced,
            (f"configured: reachability = {forced}", *evidence[: MAX_EVIDENCE - 1]),
            confirmed,
            observed_ips,
            len(answered),
        )
    k = max(1, min(needed, max(helpers_available, len(answered))))
    if len(reached) >= k:
        status = PUBLIC
    elif len(answered) >= k and not reached:
        status = PRIVATE
    else:
        status = UNKNOWN
        if not answered:
            evidence.insert(0, "no dial-back answered yet")
        else:
            evidence.insert(
                0, f"{len(answered)} of {k} helpers answered ({len(reached)} reached us)"
            )
    return Verdict(status, tuple(evidence[:MAX_EVIDENCE]), confirmed, observed_ips, len(answered))


def _describe(p: Probe) -> str:
    who = p.helper[-8:]
    if not p.addr:
        return f"helper {who} refused: {p.error}"
    if p.ok:
        return f"dial-back from {who} to {p.addr} succeeded"
    return f"dial-back from {who} to {p.addr} failed: {p.error}"


def dial_targets(
    addrs: Any, observed_ip: str
) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    """Which (ip, port) a helper may dial for ``addrs``, and refusals (pure).

    Only ``observed_ip`` is ever dialed; a private/loopback/unspecified IP is
    replaced by it (same port); another public IP is refused.
    """
    targets: list[tuple[str, int]] = []
    refused: list[dict[str, Any]] = []
    if not isinstance(addrs, list):
        return targets, [{"addr": "", "ok": False, "error": "addrs must be a list"}]
    for text in addrs[:MAX_DIAL_BACK_ADDRS]:
        endpoint = _parse_tcp(text) if isinstance(text, str) and len(text) < 256 else None
        if endpoint is None:
            refused.append({"addr": str(text)[:80], "ok": False, "error": "not a TCP multiaddr"})
            continue
        ip, port = endpoint
        if ip != observed_ip:
            if not _is_local(ip):
                refused.append(
                    {"addr": text, "ok": False, "error": "refused: not the address I see you at"}
                )
                continue
            ip = observed_ip
        if (ip, port) not in targets:
            targets.append((ip, port))
    return targets, refused


def _parse_tcp(text: str) -> tuple[str, int] | None:
    parts = text.split("/")
    if len(parts) < 5 or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    try:
        ip = str(ipaddress.ip_address(parts[2]))
        port = int(parts[4])
    except ValueError:
        return None
    if not 0 < port < 65536:
        return None
    return ip, port


def _is_local(ip: str) -> bool:
    """Private, loopback, unspecified or link-local (not an internet address)."""
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return not is_public_ip(ip)


def is_public_ip(ip: str) -> bool:
    """Globally routable, or in the documentation ranges the NAT lab uses as "the internet"."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback or addr.is_unspecified or addr.is_link_local or addr.is_multicast:
        return False
    for net in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"):
        if addr in ipaddress.ip_network(net):
            return True
    return not addr.is_private


def tcp_multiaddr(ip: str, port: int) -> str:
    return f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}"


# ------------------------------------------------------------------ the helper


class AutoNATService(Service):
    """Dial peers back on request (see the module docs for the rules)."""

    name = "autonat"
    max_request_bytes = 4096

    def __init__(self, node: Node) -> None:
        self._node = node
        self._busy: set[str] = set()
        self._limiter = trio.Semaphore(MAX_CONCURRENT_DIAL_BACKS)

    @rpc
    async def dial_back(self, ctx: CallContext, addrs: list) -> dict[str, Any]:
        node = self._node
        if not node.config.autonat:
            raise Refused("this node does not dial back", "disabled")
        observed = node.peer_remote(ctx.peer_id)
        if observed is None:
            raise Refused("no direct connection to observe you on", "relayed")
        if ctx.peer_id in self._busy:
            raise Refused("one dial-back at a time", "busy")
        targets, results = dial_targets(addrs, observed[0])
        self._busy.add(ctx.peer_id)
        try:
            async with self._limiter:
                for ip, port in targets:
                    results.append(await self._try(ctx.peer_id, ip, port))
        finally:
            self._busy.discard(ctx.peer_id)
        return {"observed": f"{observed[0]}:{observed[1]}", "results": results}

    async def _try(self, peer_id: str, ip: str, port: int) -> dict[str, Any]:
        addr = tcp_multiaddr(ip, port)
        timeout = self._node.config.autonat_timeout
        try:
            with trio.fail_after(timeout):
                await self._node.host.prove_listener(ip, port, peer_id)
        except trio.TooSlowError:
            return {"addr": addr, "ok": False, "error": f"no answer in {timeout:g} s"}
        except Exception as exc:  # refused, reset, wrong key: all mean "not reachable"
            # our words, never the exception's text (it is sent to the peer)
            return {"addr": addr, "ok": False, "error": _dial_back_failure(exc)}
        return {"addr": addr, "ok": True, "error": ""}


def _dial_back_failure(exc: BaseException) -> str:
    """What a failed dial-back tells the peer: one of a few phrases of ours."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return "unreachable"
    return "handshake failed (not you at that address?)"


# --------------------------------------------------------------- the client


class Reachability:
    """Keeps this node's :class:`Verdict` current and tells listeners when it changes."""

    def __init__(self, node: Node) -> None:
        self._node = node
        config = node.config
        self.verdict = classify(
            [], needed=config.autonat_confirmations, helpers_available=0, forced=config.reachability
        )
        self._probes: dict[str, list[Probe]] = {}  # helper -> its latest answers
        self._unsupported: dict[str, float] = {}  # helper -> monotonic time to ask again
        self._candidates: list[str] = []  # extra addresses to verify (UPnP mappings)
        self._listeners: list[Callable[[Verdict], None]] = []
        self._wake = trio.Event()
        self._epoch: tuple[str, ...] = ()
        self.rounds = 0

    def start(self) -> None:
        node = self._node
        node.register(AutoNATService(node))
        node.add_connection_listener(self._on_connection)
        node.nursery.start_soon(self._loop)

    def subscribe(self, listener: Callable[[Verdict], None]) -> None:
        """Call ``listener(verdict)`` (synchronously) whenever the verdict changes."""
        self._listeners.append(listener)

    @property
    def status(self) -> str:
        return self.verdict.status

    def add_candidate(self, addr: str) -> None:
        """Verify ``addr`` (e.g. a UPnP mapping) by dial-back before anyone advertises it."""
        if addr not in self._candidates:
            self._candidates.append(addr)
            self.recheck()

    def remove_candidate(self, addr: str) -> None:
        if addr in self._candidates:
            self._candidates.remove(addr)
            self.recheck()

    def recheck(self) -> None:
        """Probe again soon (addresses changed)."""
        self._wake.set()

    def external_ips(self) -> list[str]:
        """Our public IPs as helpers observe them (for hole-punch address prediction)."""
        return [ip for ip in self.verdict.observed_ips if is_public_ip(ip)]

    def dataplane_reachable_from(self, remote_ip: str | None) -> bool:
        """Should our data plane offer its direct socket to a peer at ``remote_ip``?

        Not when we are behind a NAT and the peer is out on the internet: its
        dial would only wait out a timeout before falling back.
        """
        if self.verdict.status != PRIVATE or remote_ip is None:
            return True
        return not is_public_ip(remote_ip)

    def to_dict(self) -> dict[str, Any]:
        return self.verdict.to_dict()

    # ---------------------------------------------------------------- probing

    def _on_connection(self, peer_id: str, connected: bool) -> None:
        if connected and (self.verdict.status == UNKNOWN or not self._probes):
            self._wake.set()

    def _addrs_to_verify(self) -> list[str]:
        out = [tcp_multiaddr(ip, port) for ip, port in self._node.host.tcp_listeners()]
        return [*out, *self._candidates][:MAX_DIAL_BACK_ADDRS]

    async def _loop(self) -> None:
        config = self._node.config
        if not config.autonat:
            return
        # With reachability forced by config the probes still run: the
        # verdict stays forced, but the evidence and our observed public IP
        # (which hole punching needs) come from them.
        await self._wake.wait()  # the first connection (or an explicit recheck)
        await trio.sleep(config.autonat_delay)
        while True:
            self._wake = trio.Event()
            epoch = tuple(self._addrs_to_verify())
            if epoch != self._epoch:
                self._epoch = epoch
                self._probes.clear()
            try:
                await self._round()
            except Exception:  # never let a probe bug stop reachability
                log.warning("reachability round failed", exc_info=True)
            self._decide()
            interval = (
                config.autonat_interval if self.verdict.status != UNKNOWN else config.autonat_retry
            )
            with trio.move_on_after(interval * random.uniform(0.9, 1.1)):
                await self._wake.wait()
                await trio.sleep(0.2)  # let a burst of changes settle

    def _helpers(self) -> list[str]:
        node = self._node
        now = time.monotonic()
        out = []
        for peer_id in node.connected_peers():
            if node.peer_remote(peer_id) is None:
                continue  # only relayed: the helper could not observe us
            if self._unsupported.get(peer_id, 0.0) > now:
                continue
            out.append(peer_id)
        return out

    async def _round(self) -> None:
        helpers = self._helpers()
        needed = self._node.config.autonat_confirmations
        fresh = [h for h in helpers if h not in self._probes]
        random.shuffle(fresh)
        chosen = fresh[: max(needed, 1) + 1] if fresh else helpers[:1]
        chosen = chosen[:MAX_HELPERS_PER_ROUND]
        if not chosen:
            return
        addrs = list(self._epoch)
        self.rounds += 1
        async with trio.open_nursery() as nursery:
            for helper in chosen:
                nursery.start_soon(self._ask, helper, addrs)

    async def _ask(self, helper: str, addrs: list[str]) -> None:
        config = self._node.config
        timeout = config.autonat_timeout * max(1, len(addrs)) + 3.0
        now = time.time()
        try:
            answer = await self._node.call(
                helper, "autonat", "dial_back", {"addrs": addrs}, timeout=timeout
            )
        except RemoteError as exc:
            # Refused (relayed, busy, disabled): ask others for a while.
            self._unsupported[helper] = time.monotonic() + config.autonat_interval
            log.debug("helper %s refused a dial-back: %s", helper[-8:], exc)
            return
        except GossamerError as exc:
            # No autonat service, or the call failed: retry later.
            self._unsupported[helper] = time.monotonic() + config.autonat_retry
            log.debug("dial-back request to %s failed: %s", helper[-8:], exc)
            return
        probes = _probes_from_answer(helper, answer, now)
        if probes:
            self._probes[helper] = probes

    def _forget_other_networks(self) -> bool:
        """Our public IP changed (new network, new ISP lease): older answers are void.

        Returns True when probes were dropped, so the caller re-checks soon.
        """

        def public_ip(probe: Probe) -> str:
            ip = probe.observed.rpartition(":")[0]
            return ip if is_public_ip(ip) else ""  # LAN helpers see LAN addresses

        latest = max(
            (p for answers in self._probes.values() for p in answers if public_ip(p)),
            key=lambda p: p.at,
            default=None,
        )
        if latest is None:
            return False
        ip = public_ip(latest)
        stale = [
            helper
            for helper, answers in self._probes.items()
            if any(public_ip(p) not in ("", ip) for p in answers)
        ]
        if not stale:
            return False
        log.info("helpers now see us at %s: re-checking reachability", ip)
        for helper in stale:
            del self._probes[helper]
        return True

    def _decide(self) -> None:
        config = self._node.config
        if self._forget_other_networks():
            self._wake.set()
        probes = [p for answers in self._probes.values() for p in answers]
        helpers = len(set(self._helpers()) | set(self._probes))
        verdict = classify(
            probes,
            needed=config.autonat_confirmations,
            helpers_available=helpers,
            forced=config.reachability,
        )
        if verdict.same_as(self.verdict):
            # keep "since" from the first time we reached this verdict
            self.verdict = Verdict(
                verdict.status,
                verdict.evidence,
                verdict.confirmed_addrs,
                verdict.observed_ips,
                verdict.helpers,
                self.verdict.since,
            )
            return
        old, self.verdict = self.verdict, verdict
        log.log(
            logging.INFO if old.status != verdict.status else logging.DEBUG,
            "reachability %s -> %s (%s)",
            old.status,
            verdict.status,
            verdict.evidence[0] if verdict.evidence else "no evidence",
        )
        for listener in list(self._listeners):
            try:
                listener(verdict)
            except Exception:
                log.warning("reachability listener failed", exc_info=True)
        if old.confirmed_addrs != verdict.confirmed_addrs:
            self._node.addresses_changed()


def _probes_from_answer(helper: str, answer: Any, now: float) -> list[Probe]:
    """Validate a helper's dial_back answer into probes (malformed parts dropped)."""
    if not isinstance(answer, dict):
        return []
    observed = answer.get("observed")
    observed = observed if isinstance(observed, str) and len(observed) < 64 else ""
    results = answer.get("results")
    if not isinstance(results, list):
        return []
    probes = []
    for item in results[: MAX_DIAL_BACK_ADDRS * 2]:
        if not isinstance(item, dict):
            continue
        addr = item.get("addr")
        ok = item.get("ok") is True
        error = item.get("error")
        if not isinstance(addr, str) or len(addr) > 256:
            continue
        if addr and _parse_tcp(addr) is None:
            continue
        probes.append(
            Probe(
                helper,
                addr,
                ok,
                str(error)[:160] if isinstance(error, str) else "",
                observed,
                now,
            )
        )
    return probes
