"""Opening a link: the HELLO exchange, from the dialing and from the listening side.

The dialer sends ``HELLO`` (run id, its charter, its state vector); the
listener answers with its own ``HELLO`` or an ``ERROR`` (unknown run, not
admitted, banned) and closes.  Either side adopts a newer charter it is shown
before deciding whether the other is admitted.  A ``HELLO`` without a state
vector is a charter probe: the listener answers and closes, which is how a
joiner learns the charter of a run id.  Every step waits at most
``hello_timeout``; what follows the hello is :class:`.link.Link`'s.

A hello is decoded before its sender is admitted, within the hello's own
budgets (:func:`.protocol.decode_hello`: bytes, objects, depth; off the event
loop when large).  A malformed or oversized hello costs its sender penalty
points and gets a short refusal written by us, never the decoder's words; the
quiet failures (no hello in time, a stream that ends) are logged through the
node's :class:`~gossamer.node.complaints.Complaints`, at most once per peer
per interval.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from gossamer.crdt.charter import Charter, CharterError
from gossamer.crdt.link import Link
from gossamer.crdt.protocol import (
    MAX_HELLO_BYTES,
    PENALTY_FORBIDDEN,
    PROTOCOL,
    RunAccessError,
    check_hello,
    decode_hello,
    error_message,
    hello_invite,
    hello_message,
    is_error,
)
from gossamer.node import FrameTooLarge, GossamerError, PeerUnreachable, ProtocolError, wire

if TYPE_CHECKING:
    from gossamer.crdt.run import Run
    from gossamer.crdt.sync import CrdtService
    from gossamer.node import Node, Stream

log = logging.getLogger(__name__)


async def dial(run: Run, peer_id: str) -> Link:
    """A new link to ``peer_id`` for ``run``, served in the run's nursery."""
    if peer_id == run.node.peer_id:
        raise GossamerError("cannot link to ourselves")
    if not run.service.may_talk(peer_id):
        raise RunAccessError(f"{peer_id[-8:]} is banned or filtered")
    stream = await run.node.open_stream(peer_id, PROTOCOL)
    reader = wire.FrameReader(stream)
    try:
        with trio.fail_after(run.options.hello_timeout):
            await stream.write(
                hello_message(run.run_id, run.charter, run.replica.state_vector(), run.invite)
            )
            payload = await reader.read_frame(MAX_HELLO_BYTES, "crdt hello")
    except (trio.TooSlowError, ConnectionError, EOFError, FrameTooLarge) as exc:
        await stream.reset()
        raise PeerUnreachable(f"crdt hello to {peer_id[-8:]} failed: {exc!r}") from None
    if payload is None:
        await stream.reset()
        raise PeerUnreachable(f"{peer_id[-8:]} closed the crdt stream during the hello")
    try:
        msg = await decode_hello(payload)
        if is_error(msg):
            raise RunAccessError(f"{peer_id[-8:]} refused run {run.run_id}: {msg[1:3]}")
        run_id, charter_blob, sv = check_hello(msg)
        if run_id != run.run_id or sv is None:
            raise ProtocolError("hello answered for another run or without a state vector")
    except (ProtocolError, RunAccessError) as exc:
        await stream.reset()
        if isinstance(exc, ProtocolError):
            run.service.penalise(peer_id, PENALTY_FORBIDDEN, f"bad hello: {exc}")
        raise
    if charter_blob is not None:
        run.consider_charter(charter_blob, peer_id)
    if not run.charter.may_join(peer_id):
        await stream.reset()
        raise RunAccessError(f"{peer_id[-8:]} is not admitted to run {run.run_id}")
    link = Link(run, stream, reader, initiator=True)
    await run.nursery.start(link.serve, sv)
    if link.closed:
        raise RunAccessError(f"{peer_id[-8:]} is banned or filtered")
    return link


async def accept(service: CrdtService, stream: Stream) -> None:
    """Answer an inbound hello; serve the link (or the charter probe) if the peer is admitted."""
    peer = stream.peer_id
    timeout = service.options.hello_timeout
    if not service.may_talk(peer):
        await stream.reset()
        return
    reader = wire.FrameReader(stream)
    try:
        with trio.fail_after(timeout):
            payload = await reader.read_frame(MAX_HELLO_BYTES, "crdt hello")
    except FrameTooLarge as exc:
        service.penalise(peer, PENALTY_FORBIDDEN, f"bad hello: {exc}")
        await stream.reset()
        return
    except (trio.TooSlowError, ConnectionError, EOFError) as exc:
        if service.node.complaints.due(peer) is not None:
            log.info("crdt: no hello from %s: %s", peer[-8:], type(exc).__name__)
        await stream.reset()
        return
    if payload is None:
        await stream.close()
        return
    try:
        msg = await decode_hello(payload)
        run_id, charter_blob, sv = check_hello(msg)
    except ProtocolError as exc:
        service.penalise(peer, PENALTY_FORBIDDEN, f"bad hello: {exc}")
        await _refuse(stream, "protocol", "malformed hello", timeout)
        return
    run = service.runs.get(run_id)
    if run is None:
        await _refuse(stream, "unknown_run", f"this node does not replicate {run_id}", timeout)
        return
    if charter_blob is not None:
        run.consider_charter(charter_blob, peer)
    if not run.charter.may_join(peer):
        invite = hello_invite(msg)
        why = f"you are not admitted to {run_id}"
        if invite is not None:
            why = service.redeem_invite(run, peer, invite)
        if not run.charter.may_join(peer):
            service.node.complaints.log(
                log, f"run:{peer}", "run %s: refused %s: %s", run_id, peer[-8:], why
            )
            await _refuse(stream, "not_admitted", why, timeout)
            return
    try:
        with trio.fail_after(timeout):
            await stream.write(hello_message(run_id, run.charter, run.replica.state_vector()))
            if sv is None:  # a charter probe: done
                await reader.read_frame(0, "end of probe")
    except (trio.TooSlowError, ConnectionError, EOFError, FrameTooLarge):
        await stream.reset()
        return
    if sv is None:
        await stream.close()
        return
    link = Link(run, stream, reader, initiator=False)
    await link.serve(sv)


async def _refuse(stream: Stream, code: str, text: str, timeout: float) -> None:
    try:
        with trio.move_on_after(timeout):
            await stream.write(error_message(code, text))
    except ConnectionError:
        pass
    await stream.close()


async def fetch_charter(
    node: Node, run_id: str, peers: list[str], timeout: float, invite: bytes | None = None
) -> Charter:
    """The charter of ``run_id``, probed from the first of ``peers`` that answers (showing
    ``invite``, if given, so that the run's creator admits us first)."""
    if not peers:
        raise PeerUnreachable(f"no peer to ask about run {run_id} (give --bootstrap)")
    last: Exception | None = None
    for peer in peers:
        try:
            stream = await node.open_stream(peer, PROTOCOL)
        except GossamerError as exc:
            last = exc
            continue
        try:
            with trio.fail_after(timeout):
                await stream.write(hello_message(run_id, None, None, invite))
                payload = await wire.FrameReader(stream).read_frame(MAX_HELLO_BYTES, "hello")
            if payload is None:
                raise PeerUnreachable(f"{peer[-8:]} closed the stream")
            msg = await decode_hello(payload)
            if is_error(msg):
                raise RunAccessError(f"{peer[-8:]} refused run {run_id}: {msg[1:3]}")
            _, blob, _ = check_hello(msg)
            if blob is None:
                raise ProtocolError("the hello carries no charter")
            return Charter.decode(blob, run_id)
        except (
            trio.TooSlowError,
            ConnectionError,
            EOFError,
            GossamerError,
            CharterError,
        ) as exc:
            last = exc
        finally:
            await stream.close()
    if isinstance(last, RunAccessError):
        raise last
    raise PeerUnreachable(f"could not get the charter of run {run_id}: {last}")
