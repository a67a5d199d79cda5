"""The ``/gossamer/crdt/1.0.0`` wire format: message kinds, limits, and the checks on them.

A link carries length-prefixed msgpack frames (limit: the largest update plus
4 KiB, see :attr:`SyncOptions.max_frame_bytes`) in both directions.  Kept apart
from the code that moves the frames so that every field a peer sends is
checked in one place, before any other module sees it.

Messages (msgpack arrays)::

    [0, 1, run_id, charter|nil, state_vector]   HELLO (first frame each way)
    [1, key|nil, signature, update]             ENVELOPE (envelope.py)
    [2, nonce, state_vector]                    SV_REQUEST: send me what I lack, then reply
    [3, nonce, state_vector]                    SV_REPLY
    [4, charter]                                CHARTER (a newer version)
    [5]                                         PING
    [6, code, text]                             ERROR, then the sender closes
    [7, client, clock]                          HAVE: I hold that author up to that clock

A state vector is a map {client id: clock}.

**Penalties.**  A refused envelope or a malformed message costs the *sending*
peer points (malformed or forged: 100, a rule violation or protocol error:
50); at 100 the peer is banned for ``ban_seconds`` — its links close and its
hellos are refused.
"""

from __future__ import annotations

from typing import Any

from gossamer.crdt.charter import Charter, CharterError, check_run_id
from gossamer.node import GossamerError, ProtocolError, wire

PROTOCOL = "/gossamer/crdt/1.0.0"
PROTOCOL_VERSION = 1

HELLO, ENVELOPE, SV_REQUEST, SV_REPLY, CHARTER, PING, ERROR, HAVE = range(8)
MAX_HELLO_BYTES = 4 << 20
MAX_SV_ENTRIES = 100_000

PENALTY_MALFORMED = 100
PENALTY_FORBIDDEN = 50
BAN_SCORE = 100


class RunAccessError(GossamerError):
    """A peer refused us access to a run (unknown run, not admitted, banned)."""


def check_sv(obj: Any) -> dict[int, int]:
    if not isinstance(obj, dict) or len(obj) > MAX_SV_ENTRIES:
        raise ProtocolError("a state vector is a map of at most 100k entries")
    for client, clock in obj.items():
        if (
            not isinstance(client, int)
            or isinstance(client, bool)
            or not 0 <= client < 2**53
            or not isinstance(clock, int)
            or isinstance(clock, bool)
            or not 0 <= clock < 2**53
        ):
            raise ProtocolError("state vector entries are {client id: clock} integers")
    return obj


def check_nonce(obj: Any) -> int:
    if not isinstance(obj, int) or isinstance(obj, bool) or not 0 <= obj < 2**63:
        raise ProtocolError("nonce must be a non-negative integer")
    return obj


def parse_hello(payload: bytes) -> tuple[str, bytes | None, dict[int, int] | None]:
    """(run id, charter blob or None, state vector) of a HELLO; ProtocolError if malformed.

    A nil state vector asks only for the charter: the listener answers its
    HELLO and closes (how a joiner learns the charter of a run id).
    """
    msg = wire.unpack(payload)
    if not isinstance(msg, list) or len(msg) != 5 or msg[0] != HELLO:
        raise ProtocolError("expected HELLO [0, version, run, charter, state vector]")
    _, version, run_id, charter, sv = msg
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"crdt protocol version {version!r} is not {PROTOCOL_VERSION}")
    if not isinstance(run_id, str):
        raise ProtocolError("run id must be a string")
    try:
        check_run_id(run_id)
    except CharterError as exc:
        raise ProtocolError(str(exc)) from None
    if charter is not None and not isinstance(charter, bytes):
        raise ProtocolError("charter must be bytes or nil")
    return run_id, charter, None if sv is None else check_sv(sv)


def hello_message(run_id: str, charter: Charter | None, sv: dict[int, int] | None) -> bytes:
    return wire.frame(
        wire.pack([HELLO, PROTOCOL_VERSION, run_id, charter.encode() if charter else None, sv])
    )


def error_message(code: str, text: str) -> bytes:
    return wire.frame(wire.pack([ERROR, code, text[:500]]))
