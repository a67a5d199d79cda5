"""The run document's layout and who may write what — pure functions, no pycrdt.

Layout: six named root maps with flat string keys; every value is one msgpack
blob (so integers stay integers and a value is replaced whole, never merged).

Keys (root, key → value; writer):

* ``config``    ``<host>/<field>``   → ``{"v": any, "seq": int}``; that host
* ``members``   ``<peer>``           → ``{"addrs", "hardware", "tokens_per_s", "role",
  "joined"}``; that peer
* ``members``   ``<peer>/hb``        → heartbeat time (float); that peer
* ``rounds``    ``<peer>``           → ``{"step": int, "status": str, "t", "hash",
  "tokens", "recent": [[step, hash], ...]}``; that peer
* ``rounds``    ``<host>/plan``      → ``{"step": int, "members": [peer], "deadline",
  "t"}``; that host
* ``fragments`` ``<peer>/<fragment>`` → ``{"step": int, "status": str, "t"}``; that peer
* ``experts``   ``<peer>/<cluster>`` → ``{"serving": bool, "t", "info": map}``; that peer
* ``metrics``   ``<peer>``           → ``{"step", "loss", "tokens", "bytes_sent",
  "bytes_recv", "tokens_per_s", "t"}``; that peer

The rules, checked on every update before it is applied:

1. **Every key has one owner**, the peer id before the first ``/``; only the
   owner writes it, and only peers the charter admits write at all.  So no two
   replicas ever write the same key, pycrdt's "higher client id wins" never
   decides anything, and an author's items only ever refer to its own earlier
   items (origins and deletions of other clients are refused).
2. **Config** keys are written only by the charter's hosts.  Each host writes its
   own copy of a field with a Lamport ``seq`` (one more than the highest it has
   seen); readers take the entry with the highest ``(seq, host id)``.
3. **Rounds move forward**: a peer's participation ``(step, status)`` never goes
   back — the step never decreases, and within a step the status only advances
   along ``joined → training → syncing → done`` (``failed`` may follow any of
   them).  A host's round plan never goes to a lower step.  The current round
   is the highest step anyone declared.
4. **Fragments** (streaming DiLoCo) are per peer and per fragment; their step
   never decreases.
5. Values are schema-checked (types, sizes); ``None`` is a tombstone and does
   not reset the forward-only rules.

A rule's verdict depends only on the update, the author's own earlier updates
and the charter, so every replica reaches the same verdict for the same update.
"""

from __future__ import annotations

import math
import re
from typing import Any

ROOTS = ("config", "members", "rounds", "fragments", "experts", "metrics")

ROUND_STATUSES = ("joined", "training", "syncing", "done", "failed")
_STATUS_RANK = {s: i for i, s in enumerate(ROUND_STATUSES)}

FIELD_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
FRAGMENT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{40,60}$")
MAX_CLUSTER = 1_000_000
SMALL_VALUE_BYTES = 64 << 10
MAX_ADDRS = 16
MAX_PLAN_MEMBERS = 10_000
MAX_RECENT_DIGESTS = 8  # a round entry's history of (step, state digest)


class RuleViolation(Exception):
    """An update writes something its author may not write; ``str()`` says what."""


def owner_of(key: str) -> str:
    return key.split("/", 1)[0]


def _sub(key: str) -> str | None:
    parts = key.split("/", 1)
    return parts[1] if len(parts) == 2 else None


def check_key(root: str, key: str, author: str, *, is_host: bool) -> None:
    """Raise RuleViolation unless ``author`` may write ``root[key]``."""
    if root not in ROOTS:
        raise RuleViolation(f"unknown root {root!r}")
    owner = owner_of(key)
    if owner != author:
        raise RuleViolation(
            f"{author[-8:]} may not write {root}[{key[:80]!r}] (owner {owner[-8:]})"
        )
    sub = _sub(key)
    if root == "config":
        if not is_host:
            raise RuleViolation(f"{author[-8:]} is not a host and may not write the config")
        if sub is None or not FIELD_RE.match(sub):
            raise RuleViolation(f"config key {key[:80]!r} is not <host>/<field>")
    elif root == "members":
        if sub not in (None, "hb"):
            raise RuleViolation(f"members key {key[:80]!r} is not <peer> or <peer>/hb")
    elif root == "rounds":
        if sub == "plan":
            if not is_host:
                raise RuleViolation(f"{author[-8:]} is not a host and may not plan rounds")
        elif sub is not None:
            raise RuleViolation(f"rounds key {key[:80]!r} is not <peer> or <host>/plan")
    elif root == "fragments":
        if sub is None or not FRAGMENT_RE.match(sub):
            raise RuleViolation(f"fragments key {key[:80]!r} is not <peer>/<fragment>")
    elif root == "experts":
        if sub is None or not sub.isdigit() or len(sub) > 7 or int(sub) > MAX_CLUSTER:
            raise RuleViolation(f"experts key {key[:80]!r} is not <peer>/<cluster number>")
    elif root == "metrics" and sub is not None:
        raise RuleViolation(f"metrics key {key[:80]!r} is not <peer>")


# ------------------------------------------------------------------ values


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise RuleViolation(what)


def _opt(record: dict[str, Any], name: str, check: Any, what: str) -> None:
    if name in record and record[name] is not None:
        _need(check(record[name]), what)


def _short_hash(v: Any) -> bool:
    return isinstance(v, str | bytes) and len(v) <= 128


def _nonneg_int(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _nonneg_num(v: Any) -> bool:
    return _is_num(v) and v >= 0


def check_value(root: str, key: str, value: Any, size: int, *, max_config_bytes: int) -> None:
    """Raise RuleViolation unless ``value`` has the shape ``root[key]`` holds."""
    if value is None:
        return  # a tombstone: the record is withdrawn
    limit = max_config_bytes if root == "config" else SMALL_VALUE_BYTES
    _need(size <= limit, f"{root} value of {size} bytes (limit {limit})")
    sub = _sub(key)
    if root == "config":
        _need(isinstance(value, dict) and "v" in value, "a config value is {'v': …, 'seq': n}")
        _need(_nonneg_int(value.get("seq")), "config 'seq' must be a non-negative integer")
    elif root == "members" and sub == "hb":
        _need(_nonneg_num(value), "a heartbeat is a time in seconds")
    elif root == "members":
        _need(isinstance(value, dict), "a member record is a map")
        addrs = value.get("addrs", [])
        _need(
            isinstance(addrs, list)
            and len(addrs) <= MAX_ADDRS
            and all(isinstance(a, str) and len(a) < 512 for a in addrs),
            f"member 'addrs' must be at most {MAX_ADDRS} multiaddr strings",
        )
        _opt(value, "hardware", lambda v: isinstance(v, dict), "member 'hardware' must be a map")
        _opt(value, "tokens_per_s", _nonneg_num, "member 'tokens_per_s' must be >= 0")
        _opt(value, "role", lambda v: isinstance(v, str) and ROLE_RE.match(v), "bad member role")
        _opt(value, "joined", _nonneg_num, "member 'joined' must be a time")
    elif root == "rounds" and sub == "plan":
        _need(isinstance(value, dict), "a round plan is a map")
        _need(_nonneg_int(value.get("step")), "plan 'step' must be a non-negative integer")
        members = value.get("members", [])
        _need(
            isinstance(members, list)
            and len(members) <= MAX_PLAN_MEMBERS
            and all(isinstance(m, str) and PEER_ID_RE.match(m) for m in members),
            "plan 'members' must be a list of peer ids",
        )
        _opt(value, "deadline", _nonneg_num, "plan 'deadline' must be a time")
    elif root == "rounds":
        _need(isinstance(value, dict), "a round entry is a map")
        _need(_nonneg_int(value.get("step")), "round 'step' must be a non-negative integer")
        _need(
            value.get("status") in _STATUS_RANK, f"round 'status' must be one of {ROUND_STATUSES}"
        )
        _opt(value, "hash", _short_hash, "bad hash")
        _opt(value, "tokens", _nonneg_int, "round 'tokens' must be a non-negative integer")
        _opt(
            value,
            "recent",
            lambda v: (
                isinstance(v, list)
                and len(v) <= MAX_RECENT_DIGESTS
                and all(
                    isinstance(x, list) and len(x) == 2 and _nonneg_int(x[0]) and _short_hash(x[1])
                    for x in v
                )
            ),
            f"round 'recent' must be at most {MAX_RECENT_DIGESTS} [step, hash] pairs",
        )
    elif root == "fragments":
        _need(isinstance(value, dict), "a fragment entry is a map")
        _need(_nonneg_int(value.get("step")), "fragment 'step' must be a non-negative integer")
        _need(
            isinstance(value.get("status"), str) and len(value["status"]) <= 32,
            "fragment 'status' must be a short string",
        )
    elif root == "experts":
        _need(isinstance(value, dict), "an expert entry is a map")
        _need(isinstance(value.get("serving"), bool), "expert 'serving' must be a boolean")
        _opt(value, "info", lambda v: isinstance(v, dict), "expert 'info' must be a map")
    elif root == "metrics":
        _need(isinstance(value, dict), "a metrics record is a map")
        for name in ("step", "tokens", "bytes_sent", "bytes_recv"):
            _opt(value, name, _nonneg_int, f"metrics '{name}' must be a non-negative integer")
        _opt(value, "loss", _is_num, "metrics 'loss' must be a finite number")
        _opt(value, "tokens_per_s", _nonneg_num, "metrics 'tokens_per_s' must be >= 0")
    if isinstance(value, dict) and "t" in value:
        _need(value["t"] is None or _nonneg_num(value["t"]), "'t' must be a time in seconds")


# ------------------------------------------------------- forward-only values

Progress = tuple[int, int]


def progress_of(root: str, key: str, value: Any) -> Progress | None:
    """The forward-only position a value claims, for keys that have one."""
    if not isinstance(value, dict):
        return None
    sub = _sub(key)
    if root == "rounds" and sub is None:
        return (value["step"], _STATUS_RANK[value["status"]])
    if root == "rounds" and sub == "plan":
        return (value["step"], 0)
    if root == "fragments":
        return (value["step"], 0)
    return None


def check_progress(root: str, key: str, before: Progress | None, after: Progress | None) -> None:
    """Raise RuleViolation if ``after`` goes back from ``before``."""
    if before is None or after is None:
        return
    step0, rank0 = before
    step1, rank1 = after
    if step1 < step0:
        raise RuleViolation(f"{root}[{key[:60]!r}] step goes back from {step0} to {step1}")
    if step1 == step0 and rank1 < rank0:
        raise RuleViolation(
            f"{root}[{key[:60]!r}] status goes back from {ROUND_STATUSES[rank0]} to "
            f"{ROUND_STATUSES[rank1]} in step {step0}"
        )


def status_rank(status: str) -> int:
    return _STATUS_RANK[status]
