"""Circuit relay v2 on the wire: protocol ids, the DHT key, and message I/O.

The libp2p circuit relay v2 spec (``/libp2p/circuit/relay/0.2.0/hop`` and
``.../stop``) with py-libp2p's protobuf messages and length-prefixed
message helpers; every read and write has a deadline.
"""

from __future__ import annotations

import logging
from enum import IntEnum
from typing import Any

import trio

from gossamer.node import _libp2p_compat as compat
from gossamer.node.errors import GossamerError

log = logging.getLogger(__name__)

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"
RELAY_CONTENT_ID = "relay-v2"  # DHT provider record of public relays
MESSAGE_TIMEOUT_S = 10.0


class RelayError(GossamerError):
    """A relay refused or failed a reservation or a circuit."""


class StatusCode(IntEnum):
    """The circuit v2 spec's status codes (``Status`` in circuit.proto)."""

    UNUSED = 0
    OK = 100
    RESERVATION_REFUSED = 200
    RESOURCE_LIMIT_EXCEEDED = 201
    PERMISSION_DENIED = 202
    CONNECTION_FAILED = 203
    NO_RESERVATION = 204
    MALFORMED_MESSAGE = 400
    UNEXPECTED_MESSAGE = 401


async def read_msg(stream: Any, cls: Any) -> Any:
    with trio.fail_after(MESSAGE_TIMEOUT_S):
        return await compat.read_delimited(stream, cls)


async def write_msg(stream: Any, message: Any) -> None:
    with trio.fail_after(MESSAGE_TIMEOUT_S):
        await compat.write_delimited(stream, message)


def status_name(code: int) -> str:
    try:
        return StatusCode(code).name
    except ValueError:
        return str(code)


async def reset_quietly(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:  # already gone
        log.debug("reset of a dead relay stream", exc_info=True)
