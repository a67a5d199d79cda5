"""The ``/gossamer/crdt/1.0.0`` wire format: message kinds, limits, and the checks on them.

A link carries length-prefixed msgpack frames (limit: the largest update plus
4 KiB, see :attr:`SyncOptions.max_frame_bytes`) in both directions.  Kept apart
from the code that moves the frames so that every field a peer sends is
checked in one place, before any other module sees it.

Messages (msgpack arrays)::

    [0, 1, run_id, charter|nil, state_vector]   HELLO (first frame each way)
    [0, 1, run_id, charter|nil, sv, invite]     HELLO with an invite token (invite.py)
    [1, key|nil, signature, update]             ENVELOPE (envelope.py)
    [2, nonce, state_vector]                    SV_REQUEST: send me what I lack, then reply
    [3, nonce, state_vector]                    SV_REPLY
    [4, charter]                                CHARTER (a newer version)
    [5]                                         PING
    [6, code, text]                             ERROR, then the sender closes
    [7, client, clock]                          HAVE: I hold that author up to that clock

A state vector is a map {client id: clock}.

**Decoding.**  Every frame is decoded with budgets on its size, its number of
objects and its depth (:func:`gossamer.node.wire.unpack`), large ones on a
worker thread.  A HELLO is decoded before its sender is admitted, so its
budgets are what the largest legitimate hello needs and no more: a charter of
at most ``MAX_CHARTER_BYTES`` and a state vector of at most ``MAX_SV_ENTRIES``.

**Penalties.**  A refused envelope or a malformed message costs the *sending*
peer points (malformed or forged: 100, a rule violation or protocol error:
50); at 100 the peer is banned for ``ban_seconds`` — its links close and its
hellos are refused.
"""

from __future__ import annotations

from typing import Any

from gossamer.crdt.charter import MAX_CHARTER_BYTES, Charter, CharterError, check_run_id
from gossamer.crdt.invite import MAX_INVITE_BYTES
from gossamer.node import GossamerError, ProtocolError, wire

PROTOCOL = "/gossamer/crdt/1.0.0"
PROTOCOL_VERSION = 1

HELLO, ENVELOPE, SV_REQUEST, SV_REPLY, CHARTER, PING, ERROR, HAVE = range(8)
MAX_SV_ENTRIES = 100_000
# [0, 1, run id, charter, {client: clock}]: ids and clocks are below 2**53 (9 bytes each)
MAX_HELLO_BYTES = MAX_CHARTER_BYTES + 18 * MAX_SV_ENTRIES + 4096 + MAX_INVITE_BYTES  # ~2.7 MiB
HELLO_MAX_OBJECTS = 7 + 2 * MAX_SV_ENTRIES  # the list, its six fields, the state vector
HELLO_MAX_DEPTH = 3  # the state vector's entries
# After the hello: the widest message is an SV_REQUEST/SV_REPLY, the deepest its entries.
MESSAGE_MAX_OBJECTS = 4 + 2 * MAX_SV_ENTRIES
MESSAGE_MAX_DEPTH = 3

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


async def decode_hello(payload: bytes) -> Any:
    """The decoded first frame of a stream (a HELLO, or an ERROR in answer to ours), within
    the hello's budgets; ProtocolError past them.  Check it with :func:`check_hello`."""
    return await wire.unpack_async(
        payload,
        max_container=MAX_SV_ENTRIES,
        max_objects=HELLO_MAX_OBJECTS,
        max_depth=HELLO_MAX_DEPTH,
    )


async def decode_message(payload: bytes) -> list[Any]:
    """A decoded link frame (any message after the hello), within its budgets; ProtocolError
    past them or if it is not a list starting with its type."""
    msg = await wire.unpack_async(
        payload,
        max_container=MAX_SV_ENTRIES,
        max_objects=MESSAGE_MAX_OBJECTS,
        max_depth=MESSAGE_MAX_DEPTH,
    )
    if not isinstance(msg, list) or not msg or not isinstance(msg[0], int):
        raise ProtocolError("a crdt message is a list starting with its type")
    return msg


def is_error(msg: Any) -> bool:
    """Whether a decoded first frame is an ERROR (the other side refused us and closes)."""
    return isinstance(msg, list) and bool(msg) and msg[0] == ERROR


def parse_hello(payload: bytes) -> tuple[str, bytes | None, dict[int, int] | None]:
    """(run id, charter blob or None, state vector) of an encoded HELLO: :func:`check_hello`."""
    return check_hello(
        wire.unpack(
            payload,
            max_container=MAX_SV_ENTRIES,
            max_objects=HELLO_MAX_OBJECTS,
            max_depth=HELLO_MAX_DEPTH,
        )
    )


def check_hello(msg: Any) -> tuple[str, bytes | None, dict[int, int] | None]:
    """(run id, charter blob or None, state vector) of a decoded HELLO; ProtocolError if malformed.

    A nil state vector asks only for the charter: the listener answers its
    HELLO and closes (how a joiner learns the charter of a run id).
    """
    if not isinstance(msg, list) or len(msg) not in (5, 6) or msg[0] != HELLO:
        raise ProtocolError("expected HELLO [0, version, run, charter, state vector(, invite)]")
    _, version, run_id, charter, sv = msg[:5]
    if len(msg) == 6 and not (isinstance(msg[5], bytes) and len(msg[5]) <= MAX_INVITE_BYTES):
        raise ProtocolError(f"an invite is at most {MAX_INVITE_BYTES} bytes")
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


def hello_invite(msg: list[Any]) -> bytes | None:
    """The invite token a HELLO (already checked by :func:`check_hello`) carries, if any."""
    return msg[5] if len(msg) == 6 else None


def hello_message(
    run_id: str,
    charter: Charter | None,
    sv: dict[int, int] | None,
    invite: bytes | None = None,
) -> bytes:
    fields = [HELLO, PROTOCOL_VERSION, run_id, charter.encode() if charter else None, sv]
    if invite is not None:
        fields.append(invite)
    return wire.frame(wire.pack(fields))


def error_message(code: str, text: str) -> bytes:
    return wire.frame(wire.pack([ERROR, code, text[:500]]))
