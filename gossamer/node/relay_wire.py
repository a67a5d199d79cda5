"""Circuit relay v2 on the wire: protocol ids, the DHT key, and message I/O.

The libp2p circuit relay v2 spec (``/libp2p/circuit/relay/0.2.0/hop`` and
``.../stop``) with py-libp2p's protobuf messages and length-prefixed
message helpers; every read and write has a deadline.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from gossamer.node.errors import GossamerError

log = logging.getLogger("gossamer.node.relay")

HOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/hop"
STOP_PROTOCOL = "/libp2p/circuit/relay/0.2.0/stop"
RELAY_CONTENT_ID = "relay-v2"  # DHT provider record of public relays
MESSAGE_TIMEOUT_S = 10.0


class RelayError(GossamerError):
    """A relay refused or failed a reservation or a circuit."""


def circuit_pb() -> Any:
    """py-libp2p's circuit v2 protobuf module (imported on first use)."""
    from libp2p.relay.circuit_v2.pb import circuit_pb2

    return circuit_pb2


async def read_msg(stream: Any, cls: Any) -> Any:
    from libp2p.relay.circuit_v2.utils import read_delimited_msg

    with trio.fail_after(MESSAGE_TIMEOUT_S):
        return await read_delimited_msg(stream, cls)


async def write_msg(stream: Any, message: Any) -> None:
    from libp2p.relay.circuit_v2.utils import write_delimited_msg

    with trio.fail_after(MESSAGE_TIMEOUT_S):
        await write_delimited_msg(stream, message)


def status_name(code: int) -> str:
    from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

    try:
        return StatusCode(code).name
    except ValueError:
        return str(code)


async def reset_quietly(stream: Any) -> None:
    try:
        await stream.reset()
    except Exception:  # already gone
        log.debug("reset of a dead relay stream", exc_info=True)


def peer_of(stream: Any) -> str:
    return stream.muxed_conn.peer_id.to_base58()
