"""Replicating run documents between nodes over ``/gossamer/crdt/1.0.0``.

One :class:`CrdtService` per node serves every run the node takes part in;
each run is a :class:`~gossamer.crdt.run.Run` (its replica, its persistent
store, its links).  The service owns what spans runs: the protocol handler,
creating, joining and reopening runs, and the peers' penalty scores (see
:mod:`.protocol`), so a peer banned in one run is banned in all.

The rest of the protocol lives beside it, one concept per module:
:mod:`.protocol` (messages and their checks), :mod:`.options`
(:class:`SyncOptions`), :mod:`.handshake` (the hello), :mod:`.link` (one
peer's stream), :mod:`.mesh` (flooding and anti-entropy), :mod:`.run`, and
:mod:`.discovery` (the optional DHT).  The names callers use are re-exported
here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gossamer.crdt import handshake
from gossamer.crdt.charter import Charter, CharterError, check_run_id
from gossamer.crdt.discovery import announce_run, find_run_peers
from gossamer.crdt.invite import Invite, InviteError, InviteLedger
from gossamer.crdt.options import SyncOptions
from gossamer.crdt.protocol import (
    BAN_SCORE,
    PROTOCOL,
    RunAccessError,
)
from gossamer.crdt.run import Run
from gossamer.crdt.store import RunStore
from gossamer.node import GossamerError, PeerUnreachable

if TYPE_CHECKING:
    from gossamer.node import Node, Stream

__all__ = ["CrdtService", "attach"]

log = logging.getLogger(__name__)


class CrdtService:
    """The run documents of one node, and the ``/gossamer/crdt/1.0.0`` protocol."""

    def __init__(
        self,
        node: Node,
        options: SyncOptions | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        # wall time for what goes into documents, monotonic for local timers (bans, links)
        self.clock = clock
        self.monotonic = monotonic
        self.options = options or SyncOptions()
        self.runs: dict[str, Run] = {}
        self._scores: dict[str, float] = {}
        self._banned_until: dict[str, float] = {}
        self.peer_filter: Callable[[str], bool] | None = None
        self.root = Path(node.config.data_dir) / "crdt"
        self._ledgers: dict[str, InviteLedger] = {}

    # ------------------------------------------------------------ startup

    @classmethod
    async def start(
        cls,
        node: Node,
        options: SyncOptions | None = None,
        *,
        resume: bool = True,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> CrdtService:
        """The node's service (created, registered and, with ``resume``, stored runs reopened)."""
        existing = node.service(CrdtService)
        if existing is not None:
            return existing
        service = cls(node, options, clock=clock, monotonic=monotonic)
        node.attach(service)
        node.set_stream_handler(PROTOCOL, service._handle_stream)
        node.add_connection_listener(service._on_connection)
        node.add_protected_peers(service._members_of_our_runs)
        service._register_control()
        node.on_close(service.aclose)
        if resume and service.root.exists():
            for directory in sorted(service.root.iterdir()):
                try:
                    check_run_id(directory.name)
                except CharterError:
                    continue
                try:
                    await service.open_run(directory.name)
                except GossamerError as exc:
                    log.warning("cannot reopen run %s: %s", directory.name, exc)
        return service

    def _members_of_our_runs(self) -> list[str]:
        """Peers admission must not evict: the members of every run we replicate."""
        out: list[str] = []
        for run in self.runs.values():
            out.extend(run.doc.members())
        return out

    async def aclose(self) -> None:
        for run in list(self.runs.values()):
            run.close()
        self.runs.clear()

    # --------------------------------------------------------------- runs

    async def _start_run(self, charter: Charter, bootstrap: list[str]) -> Run:
        run = Run(
            self,
            charter,
            RunStore(self.root / charter.run_id),
            bootstrap,
            clock=self.clock,
            monotonic=self.monotonic,
        )
        await self.node.nursery.start(run._main)
        self.runs[run.run_id] = run
        return run

    async def host_run(
        self,
        name: str,
        *,
        access: str | None = None,
        allow: list[str] | tuple[str, ...] | None = None,
        hosts: list[str] | tuple[str, ...] | None = None,
        config: dict[str, Any] | None = None,
        join: bool = True,
    ) -> Run:
        """Create (or reopen) our run ``name``; set its config and join it as a host.

        ``access`` ("open" or "restricted"), ``allow`` and ``hosts`` default to
        open / nobody / just us for a new run, and to what the stored charter
        says for a run we host already; giving them amends the charter.
        """
        identity = self.node.identity
        run_id = Charter.create(identity, name, created=0.0).run_id  # validates the name
        run = self.runs.get(run_id)
        if run is None:
            stored = RunStore(self.root / run_id).load_charter(run_id)
            if stored is None:
                stored = Charter.create(
                    identity,
                    name,
                    hosts=list(hosts or ()),
                    access=access or "open",
                    allow=list(allow or ()),
                )
            run = await self._start_run(stored, [])
        current = run.charter
        wanted_hosts = current.hosts if hosts is None else (identity.peer_id, *hosts)
        wanted_allow = current.allow if allow is None else frozenset(allow)
        wanted_access = current.access if access is None else access
        if (
            wanted_access != current.access
            or wanted_allow != current.allow
            or set(wanted_hosts) != set(current.hosts)
        ):
            run.update_charter(
                current.amend(
                    identity, hosts=list(wanted_hosts), access=wanted_access, allow=wanted_allow
                )
            )
        if config:
            run.doc.set_config(**config)
        if join:
            self._join_as_member(run, role="host")
        await announce_run(self.node, run.run_id)
        return run

    async def join_run(
        self,
        run_id: str,
        *,
        bootstrap: list[str] | tuple[str, ...] = (),
        role: str = "worker",
        timeout: float = 10.0,
        join: bool = True,
        invite: str | None = None,
    ) -> Run:
        """Join run ``run_id`` through ``bootstrap`` multiaddrs (or the DHT); sync, then join.

        ``invite``: a token from ``gossamer run invite`` (see :mod:`.invite`), shown to the
        peers we link to; the run's creator admits us with it.  Raises RunAccessError when no
        peer lets us in, PeerUnreachable when no peer can be reached, InviteError for a token
        that is not one.
        """
        check_run_id(run_id)
        invite_blob = None
        if invite is not None:
            token = Invite.parse(invite)
            if token.run_id != run_id:
                raise InviteError(f"the invite is for run {token.run_id}, not {run_id}")
            invite_blob = token.encode()
        run = self.runs.get(run_id)
        with trio.fail_after(timeout):
            peers = []
            for addr in bootstrap:
                try:
                    peers.append(await self.node.connect(addr))
                except GossamerError as exc:
                    log.info("run %s: bootstrap %s: %s", run_id, addr, exc)
            if not peers:
                peers = await find_run_peers(self.node, run_id)
            if run is None:
                charter = RunStore(self.root / run_id).load_charter(run_id)
                if charter is None:
                    charter = await handshake.fetch_charter(
                        self.node, run_id, peers, self.options.hello_timeout, invite_blob
                    )
                run = await self._start_run(charter, peers)
            else:
                run.bootstrap_peers.update(peers)
            run.invite = invite_blob
            errors = []
            for peer in peers:
                try:
                    await run.link_to(peer)
                except GossamerError as exc:
                    errors.append(exc)
            if peers and not run.linked_peers():
                first = errors[0] if errors else None
                if isinstance(first, RunAccessError):
                    raise first
                raise PeerUnreachable(f"no peer of run {run_id} answered: {first}")
        if not run.charter.may_join(self.node.peer_id):
            raise RunAccessError(f"this node is not admitted to run {run_id}")
        if join:
            await run.caught_up(timeout)
            self._join_as_member(run, role=role)
        await announce_run(self.node, run.run_id)
        return run

    async def open_run(self, run_id: str) -> Run:
        """Reopen a run from disk (restart): reload, then catch up with its members."""
        run = self.runs.get(run_id)
        if run is not None:
            return run
        charter = RunStore(self.root / run_id).load_charter(run_id)
        if charter is None:
            raise GossamerError(f"no stored charter for run {run_id}")
        run = await self._start_run(charter, [])
        me = self.node.peer_id
        member = run.doc.member(me)
        if member is not None:
            run.joined = True
            run.role = member.role
        return run

    # -------------------------------------------------------- admission

    def _own_run(self, run_id: str) -> Run:
        run = self._run_from_params({"run": run_id})
        if run.charter.creator != self.node.identity.public_key_bytes:
            raise CharterError(
                f"only the creator of run {run.run_id} ({run.charter.creator_peer_id[-10:]}) "
                "can change who may join it"
            )
        return run

    def admit(self, run_id: str, peer_id: str) -> Charter:
        """Let ``peer_id`` into our run (a new charter version, sent to every member)."""
        run = self._own_run(run_id)
        run.update_charter(run.charter.admit(self.node.identity, peer_id))
        log.info("run %s: admitted %s", run.run_id, peer_id[-8:])
        return run.charter

    def revoke(self, run_id: str, peer_id: str) -> Charter:
        """Put ``peer_id`` out of our run: its links close and every member's services refuse
        it once they hold the new charter."""
        run = self._own_run(run_id)
        run.update_charter(run.charter.revoke(self.node.identity, peer_id))
        log.info("run %s: revoked %s", run.run_id, peer_id[-8:])
        return run.charter

    def make_invite(self, run_id: str, *, ttl: float = 24 * 3600.0, uses: int = 1) -> Invite:
        """A signed invite token for our run (see :mod:`.invite`)."""
        run = self._own_run(run_id)
        return Invite.create(self.node.identity, run.run_id, ttl=ttl, uses=uses, now=self.clock())

    def redeem_invite(self, run: Run, peer_id: str, blob: bytes) -> str:
        """Admit ``peer_id`` to ``run`` with the invite ``blob`` if it is good; the reason
        otherwise (what the refusal tells the peer)."""
        if run.charter.creator != self.node.identity.public_key_bytes:
            return (
                f"invites to {run.run_id} are redeemed by its creator "
                f"{run.charter.creator_peer_id}; connect to it"
            )
        if peer_id in run.charter.deny:
            # an invite does not undo a revocation: only `run admit` does
            return f"you were revoked from {run.run_id}; an invite does not undo that"
        try:
            invite = Invite.decode(blob)
            invite.check(run.charter, self.clock())
            self._ledger(run).redeem(invite)
        except InviteError as exc:
            return f"invite refused: {exc}"
        run.update_charter(run.charter.admit(self.node.identity, peer_id))
        log.info("run %s: admitted %s with an invite", run.run_id, peer_id[-8:])
        return "admitted"

    def _ledger(self, run: Run) -> InviteLedger:
        ledger = self._ledgers.get(run.run_id)
        if ledger is None:
            ledger = InviteLedger(self.root / run.run_id / "invites.json", self.clock)
            self._ledgers[run.run_id] = ledger
        return ledger

    def _join_as_member(self, run: Run, role: str) -> None:
        run.role = role
        run.joined = True
        run.doc.join(self.node.addrs(), role=role)

    # ---------------------------------------------------------- inbound

    async def _handle_stream(self, stream: Stream) -> None:
        await handshake.accept(self, stream)

    def _on_connection(self, peer_id: str, connected: bool) -> None:
        if not connected:
            return
        for run in list(self.runs.values()):
            try:
                run.on_peer_connected(peer_id)
            except Exception:
                log.exception("run %s: connection handler failed", run.run_id)

    # -------------------------------------------------------- penalties

    def may_talk(self, peer_id: str) -> bool:
        until = self._banned_until.get(peer_id)
        if until is not None:
            if self.monotonic() < until:
                return False
            del self._banned_until[peer_id]
            self._scores.pop(peer_id, None)
        return self.peer_filter is None or self.peer_filter(peer_id)

    def is_banned(self, peer_id: str) -> bool:
        until = self._banned_until.get(peer_id)
        return until is not None and self.monotonic() < until

    def penalise(self, peer_id: str, points: float, reason: str) -> None:
        score = self._scores.get(peer_id, 0.0) + points
        self._scores[peer_id] = score
        self.node.complaints.log(
            log, peer_id, "crdt: penalising %s (+%g → %g): %s", peer_id[-8:], points, score, reason
        )
        if score >= BAN_SCORE and not self.is_banned(peer_id):
            self._banned_until[peer_id] = self.monotonic() + self.options.ban_seconds
            self.node.complaints.log(
                log,
                f"ban:{peer_id}",  # its own key: a ban is worth a line of its own
                "crdt: banning %s for %.0f s",
                peer_id[-8:],
                self.options.ban_seconds,
            )
            for run in self.runs.values():
                for link in run.links.get(peer_id, []):
                    link.close()

    def set_peer_filter(self, peer_filter: Callable[[str], bool] | None) -> None:
        """Talk only to peers for which ``peer_filter(peer_id)`` is true (None: everyone).

        For operator block lists, tests and benchmarks (a partition); links to
        peers that no longer pass are closed.
        """
        self.peer_filter = peer_filter
        if peer_filter is None:
            return
        for run in self.runs.values():
            for peer, links in list(run.links.items()):
                if not peer_filter(peer):
                    for link in links:
                        link.close()

    # ---------------------------------------------------------- control

    def _register_control(self) -> None:
        async def status(params: dict[str, Any]) -> Any:
            run = self._run_from_params(params)
            return run.status()

        async def runs(params: dict[str, Any]) -> Any:
            return [
                {
                    "run_id": run.run_id,
                    "members": len(run.doc.members()),
                    "round": run.doc.round().step,
                    "links": len(run.linked_peers()),
                }
                for run in self.runs.values()
            ]

        async def admit(params: dict[str, Any]) -> Any:
            charter = self.admit(str(params.get("run")), _peer_param(params))
            return {"version": charter.version, "allow": sorted(charter.allow)}

        async def revoke(params: dict[str, Any]) -> Any:
            charter = self.revoke(str(params.get("run")), _peer_param(params))
            return {"version": charter.version, "deny": sorted(charter.deny)}

        async def invite(params: dict[str, Any]) -> Any:
            ttl, uses = params.get("ttl", 24 * 3600.0), params.get("uses", 1)
            if not isinstance(ttl, (int, float)) or not isinstance(uses, int):
                raise GossamerError("run.invite takes a number 'ttl' and an integer 'uses'")
            token = self.make_invite(str(params.get("run")), ttl=float(ttl), uses=uses)
            return {"invite": token.text(), "expires": token.expires, "uses": token.uses}

        for name, handler in (
            ("run.status", status),
            ("run.list", runs),
            ("run.admit", admit),
            ("run.revoke", revoke),
            ("run.invite", invite),
        ):
            if name not in self.node.control_methods:
                self.node.register_control(name, handler)

    def _run_from_params(self, params: dict[str, Any]) -> Run:
        run_id = params.get("run")
        if not isinstance(run_id, str):
            raise GossamerError("run.status needs 'run', a run id")
        run = self.runs.get(run_id)
        if run is None:
            matches = [r for r in self.runs if r.startswith(run_id)]
            if len(matches) == 1:
                return self.runs[matches[0]]
            known = ", ".join(sorted(self.runs)) or "none"
            raise GossamerError(f"this node does not replicate run {run_id} (it has: {known})")
        return run


def _peer_param(params: dict[str, Any]) -> str:
    peer = params.get("peer")
    if not isinstance(peer, str):
        raise GossamerError("give 'peer', a peer id")
    return peer


async def attach(node: Node) -> None:
    """Daemon extension (``gossamer.crdt.sync:attach``): serve and reopen stored runs."""
    await CrdtService.start(node)
