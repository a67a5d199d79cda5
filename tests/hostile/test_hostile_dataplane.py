"""A hostile peer on the data plane, through real channels on loopback: crafted frames close
that peer's channel and nothing else; the node goes on serving honest peers."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
import trio
from conftest import wait_until

from gossamer.node import PeerUnreachable, TransferError
from gossamer.node.dataplane.mailbox import UNSOLICITED_OVERHEAD_BYTES
from gossamer.node.dataplane.tensors import BufferSpec


async def _honest_send_works(sender, receiver, tag: str) -> None:
    await sender.dataplane.send(receiver.peer_id, tag, {"x": torch.ones(3)}, timeout=10)
    got = await receiver.dataplane.recv(sender.peer_id, tag, timeout=10)
    assert torch.equal(got["x"], torch.ones(3))


@pytest.mark.parametrize(
    "spec_fields",
    [
        lambda s: [s.name, s.kind, [1], list(s.shape), s.nbytes],  # unhashable dtype: TypeError
        lambda s: [s.name, {"k": 1}, s.dtype, list(s.shape), s.nbytes],  # unhashable kind
        lambda s: [s.name, s.kind, s.dtype, list(s.shape), -1],
        lambda s: [s.name, s.kind, s.dtype, [2**62, 2**62], s.nbytes],  # a shape bomb
        lambda s: [[s.name], s.kind, s.dtype, list(s.shape), s.nbytes],
    ],
    ids=["dtype-list", "kind-map", "negative-size", "huge-shape", "name-list"],
)
@pytest.mark.parametrize("opened_by", ["victim", "evil"])
async def test_crafted_begin_frame_closes_only_that_channel(
    nodes, monkeypatch, caplog, spec_fields, opened_by
) -> None:
    async with nodes(3) as (victim, evil, honest):
        await evil.connect(victim.addrs()[0])
        await honest.connect(victim.addrs()[0])
        # a channel exists and works; the victim's own (the one it opened, whose reader runs
        # in its data plane's tasks) or the peer's (read in the peer's stream handler)
        if opened_by == "victim":
            await _honest_send_works(victim, evil, "warm")
        else:
            await _honest_send_works(evil, victim, "warm")

        # from here on this process's senders write crafted specs; the victim's parser is ours
        monkeypatch.setattr(BufferSpec, "to_wire", spec_fields)
        with caplog.at_level(logging.WARNING, logger="gossamer.node"), pytest.raises(TransferError):
            await evil.dataplane.send(victim.peer_id, "bad", {"x": torch.ones(3)}, timeout=5)
        monkeypatch.undo()

        # the victim is alive, serves the honest peer, and said so in one line
        await _honest_send_works(honest, victim, "after")
        await _honest_send_works(victim, honest, "back")
        closed = [r for r in caplog.records if "data channel" in r.getMessage()]
        assert closed and all(r.exc_info is None for r in closed)
        with trio.fail_after(5):
            await victim.ping(honest.peer_id)


async def test_a_flood_of_channels_from_one_peer_is_capped(nodes, caplog) -> None:
    from gossamer.node.dataplane.plane import PROTOCOL

    async with nodes(3) as (victim, evil, honest):
        await evil.connect(victim.addrs()[0])
        await honest.connect(victim.addrs()[0])
        cap = victim.config.dataplane_max_channels_per_peer
        # half-open handshakes: streams that never say hello hold a slot each while they last
        streams = []
        for _ in range(cap + 20):
            # a refused stream is reset at once, sometimes before its opener finished
            # negotiating it: the opener's side then fails, which is fine here
            with contextlib.suppress(PeerUnreachable):
                streams.append(await evil.open_stream(victim.peer_id, PROTOCOL))
        await wait_until(lambda: victim.dataplane.channels_refused >= 20, 10, what="refusals")
        assert victim.dataplane.channels_refused == 20
        refusals = [r for r in caplog.records if "refused a channel" in r.getMessage()]
        assert len(refusals) == 1  # one line per peer per minute, however many floods
        # the honest peer is not affected by the other peer's flood
        await _honest_send_works(honest, victim, "during")
        for stream in streams:
            await stream.reset()


async def test_a_peer_that_keeps_sending_crafted_frames_is_banned(node_config, monkeypatch) -> None:
    from gossamer.node import Node

    strict = {"misbehaviour_exempt_loopback": False, "misbehaviour_ban_score": 25}
    async with (
        Node(node_config("victim", **strict)) as victim,
        Node(node_config("evil")) as evil,
        Node(node_config("honest")) as honest,
    ):
        await evil.connect(victim.addrs()[0])
        await honest.connect(victim.addrs()[0])
        monkeypatch.setattr(BufferSpec, "to_wire", lambda s: [s.name, s.kind, [1], [], 0])
        for _ in range(3):  # 10 points each
            with contextlib.suppress(TransferError, PeerUnreachable):
                await evil.dataplane.send(victim.peer_id, "bad", {"x": torch.ones(3)}, timeout=5)
        monkeypatch.undo()
        assert victim.misbehaviour.banned(evil.peer_id)
        await wait_until(lambda: not victim.is_connected(evil.peer_id), 5, what="evil dropped")
        # while banned it is refused again at once; the honest peer is served throughout
        with contextlib.suppress(PeerUnreachable):
            await evil.connect(victim.addrs()[0])
        await wait_until(lambda: not victim.is_connected(evil.peer_id), 5, what="evil refused")
        await _honest_send_works(honest, victim, "fine")


async def test_one_sender_cannot_take_the_whole_unsolicited_budget(nodes) -> None:
    settings = {
        "dataplane_unsolicited_budget_bytes": 4 << 20,
        "dataplane_unsolicited_budget_per_peer_bytes": 1 << 20,
        "dataplane_unsolicited_timeout": 0.5,
    }
    async with nodes(3, **settings) as (victim, evil, honest):
        await evil.connect(victim.addrs()[0])
        await honest.connect(victim.addrs()[0])
        # 256 KiB with what each early arrival costs besides its bytes (UNSOLICITED_OVERHEAD)
        quarter = {"x": torch.zeros((1 << 16) - UNSOLICITED_OVERHEAD_BYTES // 4)}
        for i in range(4):  # nobody receives these: they wait in the victim's memory
            await evil.dataplane.send(victim.peer_id, f"hoard/{i}", quarter, timeout=10)
        with pytest.raises(TransferError, match="no receiver"):  # past its 1 MiB share
            await evil.dataplane.send(victim.peer_id, "hoard/more", quarter, timeout=10)
        # another sender still has room, although the budget's first MiB is the hoarder's
        await honest.dataplane.send(victim.peer_id, "early", quarter, timeout=10)
        got = await victim.dataplane.recv(honest.peer_id, "early", timeout=5)
        assert got["x"].numel() == quarter["x"].numel()
        assert victim.dataplane.status()["unsolicited_bytes"] == 1 << 20


async def test_empty_messages_nobody_asked_for_are_not_free(nodes) -> None:
    # each early arrival costs its bytes and an overhead: a peer cannot park millions of empty
    # messages (each a record in memory and, when it expires, a log line)
    settings = {"dataplane_unsolicited_budget_per_peer_bytes": 64 * UNSOLICITED_OVERHEAD_BYTES}
    async with nodes(2, dataplane_unsolicited_timeout=0.5, **settings) as (victim, evil):
        await evil.connect(victim.addrs()[0])
        for i in range(64):
            await evil.dataplane.send(
                victim.peer_id, f"empty/{i}", {"x": torch.zeros(0)}, timeout=5
            )
        with pytest.raises(TransferError, match="no receiver"):
            await evil.dataplane.send(
                victim.peer_id, "empty/more", {"x": torch.zeros(0)}, timeout=5
            )
        assert victim.dataplane.status()["unsolicited_bytes"] == 64 * UNSOLICITED_OVERHEAD_BYTES
