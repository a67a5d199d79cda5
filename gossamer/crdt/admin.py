"""Who may join a run, decided by its creator: invite, admit and revoke from outside the node.

:class:`RunAdmin` acts as the creator of runs kept in a data directory (its identity, its
``crdt/<run>/`` stores). When a node runs there (a foreground ``run host``, an SDK worker, a
daemon), each call goes to it over the control API (``run.invite``/``run.admit``/``run.revoke``,
registered by :mod:`.sync`), so a new charter reaches the members at once and a revoked member
is cut off mid-run. With no node running, ``admit``/``revoke`` amend the stored charter (the
node publishes it when it next opens the run) and ``invite`` signs a token offline (its uses are
counted by the creator's node when redeemed). What the CLI's ``gossamer run invite|admit|revoke``
and the SDK's ``Worker.invite|admit|revoke`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossamer.crdt.charter import Charter, CharterError
from gossamer.crdt.invite import Invite
from gossamer.crdt.store import RunStore
from gossamer.node import (
    ControlClient,
    ControlError,
    GossamerError,
    Identity,
    NoDaemon,
    load_or_create,
)


@dataclass(frozen=True)
class AdminResult:
    answer: dict[str, Any]  # invite: {invite, expires, uses}; admit/revoke: {version, …}
    live: bool  # True: a running node did it; False: done on disk / offline


class RunAdmin:
    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)

    def invite(self, run: str, *, ttl: float = 24 * 3600.0, uses: int = 1) -> AdminResult:
        answer = self._live("run.invite", {"run": run, "ttl": ttl, "uses": uses})
        if answer is not None:
            return AdminResult(answer, True)
        identity, _, charter = self._stored(run)
        token = Invite.create(identity, charter.run_id, ttl=ttl, uses=uses)
        return AdminResult({"invite": token.text(), "expires": token.expires, "uses": uses}, False)

    def admit(self, run: str, peer_id: str) -> AdminResult:
        return self._amend("admit", run, peer_id)

    def revoke(self, run: str, peer_id: str) -> AdminResult:
        return self._amend("revoke", run, peer_id)

    def _amend(self, verb: str, run: str, peer_id: str) -> AdminResult:
        answer = self._live(f"run.{verb}", {"run": run, "peer": peer_id})
        if answer is not None:
            return AdminResult(answer, True)
        identity, store, charter = self._stored(run)
        amended = (charter.admit if verb == "admit" else charter.revoke)(identity, peer_id)
        store.save_charter(amended)
        return AdminResult({"version": amended.version}, False)

    def _live(self, method: str, params: dict[str, Any]) -> dict[str, Any] | None:
        try:
            with ControlClient(self.data_dir) as client:
                return client.call(method, params)
        except NoDaemon:
            return None
        except ControlError as exc:
            if exc.type == "unknown_method":
                return None  # a node without run documents: do it on disk
            raise GossamerError(exc.message) from None

    def _stored(self, run: str) -> tuple[Identity, RunStore, Charter]:
        root = self.data_dir / "crdt"
        names = sorted(p.name for p in root.glob(f"{run}*") if (p / "charter.bin").exists())
        if run in names:
            names = [run]
        if len(names) != 1:
            raise CharterError(
                f"{self.data_dir} holds no run {run!r}" if not names else f"{run!r} is ambiguous"
            )
        identity = load_or_create(self.data_dir)
        store = RunStore(root / names[0])
        charter = store.load_charter(names[0])
        if charter is None:
            raise CharterError(f"the stored charter of {names[0]} is unreadable")
        if charter.creator != identity.public_key_bytes:
            raise CharterError(f"{self.data_dir} did not create {names[0]}: only its creator can")
        return identity, store, charter
