"""A hostile peer on the data plane, through real channels on loopback: crafted frames close
that peer's channel and nothing else; the node goes on serving honest peers."""

from __future__ import annotations

import logging

import pytest
import torch
import trio

from gossamer.node import TransferError
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
