"""RunDocument: the typed view of a run's replicated state that training code uses.

No pycrdt here: every accessor returns plain frozen dataclasses with real
ints and floats, and every setter goes through :meth:`Replica.write`, which
checks the rules (rules.py) before anything changes and returns the signed
envelope that the sync layer sends.  Aggregations that last-writer-wins would
get wrong are done here, deterministically, from per-writer keys:

* config field → the entry with the highest ``(seq, host id)``;
* current round → the highest step any member or plan declared;
* experts → every peer that says it serves a cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gossamer.crdt import rules
from gossamer.crdt.charter import Charter
from gossamer.crdt.envelope import Envelope
from gossamer.crdt.replica import Receipt, Replica, Verdict, WriteError

CONFIG_FIELDS = ("model", "data", "hparams")


@dataclass(frozen=True)
class RunConfig:
    """The run's configuration as the hosts last set it."""

    fields: Mapping[str, Any]
    hosts: tuple[str, ...]

    @property
    def model(self) -> Any:
        return self.fields.get("model")

    @property
    def data(self) -> Any:
        return self.fields.get("data")

    @property
    def hparams(self) -> dict[str, Any]:
        value = self.fields.get("hparams")
        return value if isinstance(value, dict) else {}

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


@dataclass(frozen=True)
class Member:
    peer_id: str
    addrs: tuple[str, ...] = ()
    hardware: Mapping[str, Any] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    role: str = "worker"
    joined: float | None = None
    heartbeat: float | None = None

    def age(self, now: float) -> float | None:
        """Seconds since the last heartbeat (None if it never sent one)."""
        return None if self.heartbeat is None else max(0.0, now - self.heartbeat)


@dataclass(frozen=True)
class RoundEntry:
    """One member's participation in a round."""

    peer_id: str
    step: int
    status: str
    updated: float | None = None
    hash: str | bytes | None = None
    tokens: int | None = None
    # the digests of the states it held in its latest rounds, (step, hash): a member whose
    # entry moved on still answers for the rounds others check parity of
    recent: tuple[tuple[int, str | bytes], ...] = ()


@dataclass(frozen=True)
class RoundPlan:
    """A host's plan for a round: who is in it and until when."""

    host: str
    step: int
    members: tuple[str, ...]
    deadline: float | None = None


@dataclass(frozen=True)
class RoundView:
    """The current outer step: the highest step anyone declared or planned."""

    step: int
    status: str  # the least advanced status among participants; "idle" if none
    participants: Mapping[str, RoundEntry]
    plan: RoundPlan | None


@dataclass(frozen=True)
class Fragment:
    peer_id: str
    fragment: str
    step: int
    status: str
    updated: float | None = None


@dataclass(frozen=True)
class Metrics:
    peer_id: str
    step: int = 0
    loss: float | None = None
    tokens: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    tokens_per_s: float = 0.0
    updated: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


_METRIC_FIELDS = ("step", "loss", "tokens", "bytes_sent", "bytes_recv", "tokens_per_s", "t")


class RunDocument:
    """Typed accessors over one run's :class:`Replica`."""

    def __init__(self, replica: Replica, clock: Callable[[], float] = time.time) -> None:
        self.replica = replica
        self._clock = clock

    # ------------------------------------------------------------ identity

    @property
    def run_id(self) -> str:
        return self.replica.run_id

    @property
    def charter(self) -> Charter:
        return self.replica.charter

    @property
    def peer_id(self) -> str:
        if self.replica.peer_id is None:
            raise WriteError("this document has no identity")
        return self.replica.peer_id

    def is_host(self, peer_id: str | None = None) -> bool:
        return self.charter.is_host(peer_id or self.peer_id)

    def _write(self, *changes: tuple[str, str, Any]) -> Envelope:
        return self.replica.write(changes)

    # -------------------------------------------------------------- config

    def config(self) -> RunConfig:
        best: dict[str, tuple[int, str, Any]] = {}
        hosts = self.charter.hosts
        for key, value in self.replica.items("config"):
            host, name = key.split("/", 1)
            if host not in hosts or not isinstance(value, dict):
                continue
            candidate = (value["seq"], host, value.get("v"))
            if name not in best or candidate[:2] > best[name][:2]:
                best[name] = candidate
        return RunConfig({name: entry[2] for name, entry in sorted(best.items())}, hosts)

    def set_config(self, **fields: Any) -> Envelope:
        """Set config fields (hosts only): ``model=…, data=…, hparams={…}`` or any other name."""
        if not fields:
            raise WriteError("set_config needs at least one field")
        me = self.peer_id
        changes = []
        for name, value in fields.items():
            seq = 1 + max(
                (v["seq"] for k, v in self.replica.items("config") if k.split("/", 1)[1] == name),
                default=-1,
            )
            changes.append(("config", f"{me}/{name}", {"v": value, "seq": seq}))
        return self._write(*changes)

    # ------------------------------------------------------------- members

    def members(self) -> dict[str, Member]:
        records: dict[str, dict[str, Any]] = {}
        beats: dict[str, float] = {}
        for key, value in self.replica.items("members"):
            peer, _, sub = key.partition("/")
            if sub == "hb":
                beats[peer] = float(value)
            elif isinstance(value, dict):
                records[peer] = value
        return {
            peer: Member(
                peer_id=peer,
                addrs=tuple(rec.get("addrs", ())),
                hardware=rec.get("hardware") or {},
                tokens_per_s=float(rec.get("tokens_per_s") or 0.0),
                role=rec.get("role") or "worker",
                joined=rec.get("joined"),
                heartbeat=beats.get(peer),
            )
            for peer, rec in sorted(records.items())
        }

    def member(self, peer_id: str) -> Member | None:
        return self.members().get(peer_id)

    def live_members(self, max_age: float, now: float | None = None) -> list[str]:
        """Members whose last heartbeat is at most ``max_age`` seconds old."""
        now = self._clock() if now is None else now
        return [
            p
            for p, m in self.members().items()
            if m.heartbeat is not None and now - m.heartbeat <= max_age
        ]

    def join(
        self,
        addrs: list[str] | tuple[str, ...] = (),
        *,
        hardware: Mapping[str, Any] | None = None,
        tokens_per_s: float = 0.0,
        role: str = "worker",
    ) -> Envelope:
        """Write (or rewrite) our member record and a heartbeat."""
        me = self.peer_id
        now = self._clock()
        current = self.replica.get("members", me)
        joined = current.get("joined", now) if isinstance(current, dict) else now
        record = {
            "addrs": list(addrs),
            "hardware": dict(hardware or {}),
            "tokens_per_s": float(tokens_per_s),
            "role": role,
            "joined": joined,
        }
        return self._write(("members", me, record), ("members", f"{me}/hb", now))

    def update_member(self, **changes: Any) -> Envelope:
        """Change fields of our member record (addrs, hardware, tokens_per_s, role)."""
        me = self.peer_id
        current = self.replica.get("members", me)
        if not isinstance(current, dict):
            raise WriteError("join the run before updating the member record")
        record = dict(current)
        for name, value in changes.items():
            if name not in ("addrs", "hardware", "tokens_per_s", "role"):
                raise WriteError(f"unknown member field {name!r}")
            record[name] = list(value) if name == "addrs" else value
        return self._write(("members", me, record))

    def heartbeat(self, now: float | None = None) -> Envelope:
        return self._write(("members", f"{self.peer_id}/hb", self._clock() if now is None else now))

    def leave(self) -> Envelope:
        """Withdraw our member record, heartbeat and expert announcements."""
        me = self.peer_id
        changes = [("members", me, None), ("members", f"{me}/hb", None)]
        for key, _ in self.replica.items("experts"):
            if key.startswith(me + "/"):
                changes.append(("experts", key, None))
        return self._write(*changes)

    # -------------------------------------------------------------- rounds

    def round_entries(self) -> dict[str, RoundEntry]:
        out = {}
        for key, value in self.replica.items("rounds"):
            if "/" in key or not isinstance(value, dict):
                continue
            out[key] = RoundEntry(
                peer_id=key,
                step=value["step"],
                status=value["status"],
                updated=value.get("t"),
                hash=value.get("hash"),
                tokens=value.get("tokens"),
                recent=tuple((int(s), h) for s, h in value.get("recent", ())),
            )
        return out

    def round_plan(self) -> RoundPlan | None:
        best: RoundPlan | None = None
        for key, value in self.replica.items("rounds"):
            host, _, sub = key.partition("/")
            if sub != "plan" or not isinstance(value, dict) or not self.charter.is_host(host):
                continue
            plan = RoundPlan(
                host, value["step"], tuple(value.get("members", ())), value.get("deadline")
            )
            if best is None or (plan.step, plan.host) > (best.step, best.host):
                best = plan
        return best

    def round(self) -> RoundView:
        entries = self.round_entries()
        plan = self.round_plan()
        step = max([e.step for e in entries.values()] + ([plan.step] if plan else []), default=0)
        participants = {p: e for p, e in sorted(entries.items()) if e.step == step}
        active = [e.status for e in participants.values() if e.status != "failed"]
        if active:
            status = min(active, key=rules.status_rank)
        elif participants:
            status = "failed"
        else:
            status = "idle"
        return RoundView(step, status, participants, plan if plan and plan.step == step else None)

    def my_round(self) -> RoundEntry | None:
        return self.round_entries().get(self.peer_id)

    def enter_round(
        self,
        step: int,
        status: str = "joined",
        *,
        hash: str | bytes | None = None,
        tokens: int | None = None,
        recent: Sequence[tuple[int, str | bytes]] = (),
    ) -> Envelope:
        """Declare our participation in ``step`` (forward only: see rules.py); ``recent``:
        the (step, digest) of the states we held in our latest rounds."""
        value: dict[str, Any] = {"step": int(step), "status": status, "t": self._clock()}
        if hash is not None:
            value["hash"] = hash
        if tokens is not None:
            value["tokens"] = int(tokens)
        if recent:
            value["recent"] = [[int(s), h] for s, h in recent]
        return self._write(("rounds", self.peer_id, value))

    def set_round_status(
        self, status: str, *, hash: str | bytes | None = None, tokens: int | None = None
    ) -> Envelope:
        mine = self.my_round()
        if mine is None:
            raise WriteError("enter a round before setting its status")
        return self.enter_round(
            mine.step,
            status,
            hash=hash if hash is not None else mine.hash,
            tokens=tokens if tokens is not None else mine.tokens,
            recent=mine.recent,
        )

    def plan_round(
        self, step: int, members: list[str] | tuple[str, ...], deadline: float | None = None
    ) -> Envelope:
        """Publish who is in round ``step`` (hosts only; steps only move forward)."""
        value: dict[str, Any] = {"step": int(step), "members": list(members), "t": self._clock()}
        if deadline is not None:
            value["deadline"] = float(deadline)
        return self._write(("rounds", f"{self.peer_id}/plan", value))

    # ----------------------------------------------------------- fragments

    def fragments(self) -> list[Fragment]:
        out = []
        for key, value in self.replica.items("fragments"):
            peer, name = key.split("/", 1)
            out.append(Fragment(peer, name, value["step"], value["status"], value.get("t")))
        return sorted(out, key=lambda f: (f.fragment, f.peer_id))

    def set_fragment(self, fragment: str | int, step: int, status: str) -> Envelope:
        value = {"step": int(step), "status": status, "t": self._clock()}
        return self._write(("fragments", f"{self.peer_id}/{fragment}", value))

    # ------------------------------------------------------------- experts

    def experts(self) -> dict[int, list[str]]:
        """Cluster id → peers serving it (sorted)."""
        out: dict[int, list[str]] = {}
        for key, value in self.replica.items("experts"):
            peer, cluster = key.split("/", 1)
            if value.get("serving"):
                out.setdefault(int(cluster), []).append(peer)
        return {k: sorted(v) for k, v in sorted(out.items())}

    def expert_info(self, cluster: int) -> dict[str, dict[str, Any]]:
        """Peer → the info it published for ``cluster`` (serving peers only)."""
        out = {}
        for key, value in self.replica.items("experts"):
            peer, c = key.split("/", 1)
            if int(c) == cluster and value.get("serving"):
                out[peer] = dict(value.get("info") or {})
        return out

    def serve_expert(
        self, cluster: int, serving: bool = True, info: Mapping[str, Any] | None = None
    ) -> Envelope:
        value: dict[str, Any] = {"serving": bool(serving), "t": self._clock()}
        if info:
            value["info"] = dict(info)
        return self._write(("experts", f"{self.peer_id}/{int(cluster)}", value))

    # ------------------------------------------------------------- metrics

    def metrics(self) -> dict[str, Metrics]:
        out = {}
        for peer, value in self.replica.items("metrics"):
            if not isinstance(value, dict):
                continue
            out[peer] = Metrics(
                peer_id=peer,
                step=value.get("step") or 0,
                loss=value.get("loss"),
                tokens=value.get("tokens") or 0,
                bytes_sent=value.get("bytes_sent") or 0,
                bytes_recv=value.get("bytes_recv") or 0,
                tokens_per_s=float(value.get("tokens_per_s") or 0.0),
                updated=value.get("t"),
                extra={k: v for k, v in value.items() if k not in _METRIC_FIELDS},
            )
        return dict(sorted(out.items()))

    def report_metrics(
        self,
        *,
        step: int,
        loss: float | None = None,
        tokens: int = 0,
        bytes_sent: int = 0,
        bytes_recv: int = 0,
        tokens_per_s: float = 0.0,
        **extra: Any,
    ) -> Envelope:
        """Replace our metrics record (cumulative tokens and bytes, latest loss)."""
        value: dict[str, Any] = {
            "step": int(step),
            "loss": None if loss is None else float(loss),
            "tokens": int(tokens),
            "bytes_sent": int(bytes_sent),
            "bytes_recv": int(bytes_recv),
            "tokens_per_s": float(tokens_per_s),
            "t": self._clock(),
            **extra,
        }
        return self._write(("metrics", self.peer_id, value))

    def totals(self) -> dict[str, int]:
        metrics = self.metrics().values()
        return {
            "tokens": sum(m.tokens for m in metrics),
            "bytes_sent": sum(m.bytes_sent for m in metrics),
            "bytes_recv": sum(m.bytes_recv for m in metrics),
        }

    # --------------------------------------------------------------- events

    def on_change(self, callback: Callable[[frozenset[str], str], None]) -> Callable[[], None]:
        """Call ``callback(roots, author_peer_id)`` after each applied update; returns an undo."""

        def listener(receipt: Receipt, source: Any) -> None:
            if receipt.verdict is Verdict.APPLIED and receipt.envelope is not None:
                callback(receipt.touched, receipt.envelope.author_peer_id)

        self.replica.add_listener(listener)
        return lambda: self.replica.remove_listener(listener)

    # -------------------------------------------------------------- status

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Everything as JSON-able data (what ``gossamer run status`` shows)."""
        now = self._clock() if now is None else now
        view = self.round()
        charter = self.charter
        return {
            "run_id": self.run_id,
            "name": charter.name,
            "access": charter.access,
            "hosts": list(charter.hosts),
            "charter_version": charter.version,
            "config": _jsonable(dict(self.config().fields)),
            "members": [
                {
                    "peer_id": m.peer_id,
                    "role": m.role,
                    "addrs": list(m.addrs),
                    "tokens_per_s": m.tokens_per_s,
                    "hardware": _jsonable(dict(m.hardware)),
                    "heartbeat_age_s": None if m.age(now) is None else round(m.age(now) or 0, 1),
                }
                for m in self.members().values()
            ],
            "round": {
                "step": view.step,
                "status": view.status,
                "participants": {
                    p: {"status": e.status, "tokens": e.tokens}
                    for p, e in view.participants.items()
                },
                "plan": None
                if view.plan is None
                else {
                    "host": view.plan.host,
                    "members": list(view.plan.members),
                    "deadline": view.plan.deadline,
                },
            },
            "metrics": {
                p: {
                    "step": m.step,
                    "loss": m.loss,
                    "tokens": m.tokens,
                    "bytes_sent": m.bytes_sent,
                    "bytes_recv": m.bytes_recv,
                    "tokens_per_s": m.tokens_per_s,
                }
                for p, m in self.metrics().items()
            },
            "totals": self.totals(),
            "experts": {str(k): v for k, v in self.experts().items()},
            "fragments": [
                {"peer_id": f.peer_id, "fragment": f.fragment, "step": f.step, "status": f.status}
                for f in self.fragments()
            ],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return f"<{len(value)} bytes>"
    return value
