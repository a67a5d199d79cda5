"""State sync under a hostile peer, through real nodes on loopback: only the members of the run
that names a state get it, a request's chunks are served once each, one upload per peer at a
time, and the bytes a peer can make us send are a budget; plus the budget's rules alone."""

from __future__ import annotations

import contextlib
import logging
import os

import pytest
import torch
from conftest import running_nodes, wait_until
from diloco_helpers import FAST

from gossamer.crdt import CrdtService
from gossamer.node import RemoteError
from gossamer.training import statesync
from gossamer.training.outer import init_outer_state
from gossamer.training.statesync import ServeBudget, StateService, StateSyncError

CHUNK = 4096  # elements per chunk in these tests (16 KiB)


def _snapshot() -> statesync.Snapshot:
    params = {"w": torch.arange(3 * CHUNK, dtype=torch.float32).reshape(3, CHUNK)}
    snapshot = statesync.make_snapshot(params, init_outer_state(params))
    assert len(snapshot.spans()) == 6
    return snapshot


@contextlib.asynccontextmanager
async def _run(node_config, members: int = 1, member_overrides=None, **service_settings):
    """A holder hosting a run, ``members`` peers that joined it, an outsider that did not (but
    is connected to the holder); the holder serves a state (not yet named in the run)."""
    configs = [node_config(), node_config()]
    configs += [node_config(**(member_overrides or {})) for _ in range(members)]
    async with running_nodes(configs) as (holder, outsider, *joined):
        host = await (await CrdtService.start(holder, FAST)).host_run("ss")
        for node in joined:
            service = await CrdtService.start(node, FAST)
            await service.join_run(host.run_id, bootstrap=[holder.addrs()[0]])
        await outsider.connect(holder.addrs()[0])
        await wait_until(lambda: all(host.doc.member(n.peer_id) for n in joined), what="joins")
        server = StateService.attach(holder, **service_settings)
        snapshot = _snapshot()
        server.publish(snapshot)
        yield holder, host, server, snapshot, outsider, joined


def _name_in_run(host, snapshot) -> None:
    host.doc.enter_round(0, "training", hash=snapshot.digest)


async def _ask(node, holder, snapshot, indices, *, receive=True):
    """Ask ``holder`` for chunks ``indices``; returns the posted receives (by chunk)."""
    tag = f"ss/{os.urandom(6).hex()}"
    spans = snapshot.spans()
    pending = {}
    if receive:
        for i in set(indices):
            a, b = spans[i]
            pending[i] = node.dataplane.post_recv(
                holder.peer_id, f"{tag}/{i}", into={"x": torch.empty(b - a)}
            )
    params = {"digest": snapshot.digest, "chunks": list(indices), "tag": tag}
    await node.call(holder.peer_id, "statesync", "send", params, timeout=10)
    return tag, pending


async def _refused(node, holder, method: str, params: dict) -> str:
    with pytest.raises(RemoteError) as caught:
        await node.call(holder.peer_id, "statesync", method, params, timeout=10)
    return caught.value.code


async def _received(server, pending) -> None:
    for p in pending.values():
        await p.wait(10)
    await wait_until(lambda: not server.sending, what="the upload to end")


async def test_a_non_member_is_refused_and_gets_no_bytes(node_config, monkeypatch, caplog):
    monkeypatch.setattr(statesync, "CHUNK_ELEMS", CHUNK)
    caplog.set_level(logging.INFO, logger="gossamer.training.statesync")
    async with _run(node_config) as (holder, host, server, snapshot, outsider, (member,)):
        # a state no run of ours names is served to nobody, not even to a member
        assert await _refused(member, holder, "manifest", {"digest": snapshot.digest}) == (
            "not_member"
        )
        _name_in_run(host, snapshot)
        manifest = {"digest": snapshot.digest}
        everything = {"digest": snapshot.digest, "chunks": list(range(6)), "tag": "ss/x"}
        assert await _refused(outsider, holder, "manifest", manifest) == "not_member"
        for _ in range(20):
            assert await _refused(outsider, holder, "send", everything) == "not_member"
        with pytest.raises(StateSyncError):
            await statesync.fetch_state(outsider, snapshot.digest, [holder.peer_id], timeout=10)
        assert server.bytes_served == 0 and holder.dataplane.bytes_sent == 0
        lines = [
            r
            for r in caplog.records
            if r.name == "gossamer.training.statesync"
            and "refused " + outsider.peer_id[-8:] in r.getMessage()
        ]
        assert len(lines) == 1 and "not_member" in lines[0].getMessage()  # once a minute

        # the member gets the state, and exactly one copy of it
        fetched = await statesync.fetch_state(member, snapshot.digest, [holder.peer_id])
        assert fetched.digest == snapshot.digest
        assert torch.equal(fetched.params["w"].reshape(-1), snapshot.flat[: 3 * CHUNK])
        assert server.bytes_served == snapshot.nbytes == holder.dataplane.bytes_sent

        # a member that left is a member no more
        member_run = member.service(CrdtService).runs[host.run_id]
        member_run.doc.leave()
        await wait_until(lambda: host.doc.member(member.peer_id) is None, what="the leave")
        assert await _refused(member, holder, "manifest", manifest) == "not_member"


async def test_a_member_asking_for_one_chunk_a_thousand_times_gets_it_once(
    node_config, monkeypatch
):
    monkeypatch.setattr(statesync, "CHUNK_ELEMS", CHUNK)
    async with _run(node_config) as (holder, host, server, snapshot, _, (member,)):
        _name_in_run(host, snapshot)
        _, pending = await _ask(member, holder, snapshot, [0] * 1000)
        await _received(server, pending)
        assert server.bytes_served == 4 * CHUNK == holder.dataplane.bytes_sent
        assert member.dataplane.status()["unsolicited_bytes"] == 0
        bad = {"digest": snapshot.digest, "chunks": [0, 6], "tag": "ss/x"}
        assert await _refused(member, holder, "send", bad) == "bad_chunks"
        bad = {"digest": snapshot.digest, "chunks": [True], "tag": "ss/x"}
        assert await _refused(member, holder, "send", bad) == "bad_chunks"
        bad = {"digest": snapshot.digest, "chunks": [0], "tag": "other/x"}
        assert await _refused(member, holder, "send", bad) == "bad_tag"
        unknown = {"digest": "0" * 64}
        assert await _refused(member, holder, "manifest", unknown) == "unknown_state"
        assert server.bytes_served == 4 * CHUNK


async def test_one_upload_per_peer_and_a_few_peers_at_a_time(node_config, monkeypatch):
    monkeypatch.setattr(statesync, "CHUNK_ELEMS", CHUNK)
    # the members buffer nothing they did not ask for: an upload whose receives are not
    # posted waits (the data plane holds its sender back) until they are
    stalls = {"dataplane_unsolicited_budget_bytes": 0}
    async with _run(node_config, 2, stalls, max_sending_peers=1) as (
        holder,
        host,
        server,
        snapshot,
        _,
        (member, other),
    ):
        _name_in_run(host, snapshot)
        tag, _ = await _ask(member, holder, snapshot, range(6), receive=False)
        await wait_until(lambda: server.sending == {member.peer_id}, what="the upload")
        everything = {"digest": snapshot.digest, "chunks": list(range(6)), "tag": "ss/y"}
        assert await _refused(member, holder, "send", everything) == "busy"  # its own
        assert await _refused(other, holder, "send", everything) == "busy"  # the node's cap
        assert server.sending == {member.peer_id}
        spans = snapshot.spans()
        pending = [
            member.dataplane.post_recv(holder.peer_id, f"{tag}/{i}", into={"x": torch.empty(b - a)})
            for i, (a, b) in enumerate(spans)
        ]
        await _received(server, dict(enumerate(pending)))
        _, pending_other = await _ask(other, holder, snapshot, range(6))
        await _received(server, pending_other)
        assert server.bytes_served == 2 * snapshot.nbytes


async def test_requests_beyond_the_budget_are_refused_until_it_drains(node_config, monkeypatch):
    monkeypatch.setattr(statesync, "CHUNK_ELEMS", CHUNK)
    now = [1000.0]
    async with _run(node_config, clock=lambda: now[0]) as (
        holder,
        host,
        server,
        snapshot,
        _,
        (member,),
    ):
        _name_in_run(host, snapshot)
        for _ in range(2):  # two copies a minute
            _, pending = await _ask(member, holder, snapshot, range(6))
            await _received(server, pending)
        everything = {"digest": snapshot.digest, "chunks": list(range(6)), "tag": "ss/z"}
        assert await _refused(member, holder, "send", everything) == "rate_limited"
        assert await _refused(member, holder, "send", {**everything, "chunks": [5]}) == (
            "rate_limited"
        )
        now[0] += 0.5 * statesync.BUDGET_WINDOW_S  # half a window: one copy drained
        _, pending = await _ask(member, holder, snapshot, range(6))
        await _received(server, pending)
        assert await _refused(member, holder, "send", everything) == "rate_limited"
        assert server.bytes_served == 3 * snapshot.nbytes


# ---------------------------------------------------------------- the budget's rules alone


def test_budget_grants_up_to_its_capacity_per_peer():
    budget = ServeBudget(window=60.0)
    assert budget.grant("a", 60, 100, now=0.0)
    assert budget.grant("a", 40, 100, now=0.0)
    assert not budget.grant("a", 1, 100, now=0.0)
    assert budget.grant("b", 100, 100, now=0.0)  # peers do not share a budget
    assert not budget.grant("c", 101, 100, now=0.0)  # more than the capacity never fits
    assert budget.spent("a", 100, now=0.0) == 100


def test_budget_drains_over_its_window():
    budget = ServeBudget(window=60.0)
    assert budget.grant("a", 100, 100, now=0.0)
    assert not budget.grant("a", 50, 100, now=29.0)
    assert budget.grant("a", 50, 100, now=30.0)
    assert budget.spent("a", 100, now=30.0) == 100
    assert budget.spent("a", 100, now=1000.0) == 0
    assert not budget.grant("a", 1, 100, now=10.0)  # a clock that went back gives nothing


def test_budget_refunds_what_was_never_sent():
    budget = ServeBudget(window=60.0)
    assert budget.grant("a", 100, 100, now=0.0)
    budget.refund("a", 70, 100, now=0.0)
    assert budget.spent("a", 100, now=0.0) == 30
    budget.refund("a", 1000, 100, now=0.0)
    assert budget.spent("a", 100, now=0.0) == 0
    budget.refund("nobody", 10, 100, now=0.0)
    assert budget.spent("nobody", 100, now=0.0) == 0


def test_budget_remembers_a_bounded_number_of_peers():
    budget = ServeBudget(window=60.0, max_peers=2)
    for peer in ("a", "b", "c"):
        assert budget.grant(peer, 100, 100, now=0.0)
    assert budget.spent("a", 100, now=0.0) == 0  # forgotten first
    assert budget.spent("c", 100, now=0.0) == 100
    with pytest.raises(ValueError):
        ServeBudget(window=0)


async def test_a_revoked_member_is_refused_state_at_once(node_config, monkeypatch):
    monkeypatch.setattr(statesync, "CHUNK_ELEMS", CHUNK)
    async with _run(node_config) as (holder, host, _server, snapshot, _, (member,)):
        _name_in_run(host, snapshot)
        manifest = {"digest": snapshot.digest}
        assert await member.call(holder.peer_id, "statesync", "manifest", manifest, timeout=10)
        holder.service(CrdtService).revoke(host.run_id, member.peer_id)
        assert host.doc.member(member.peer_id) is not None  # its record stays; its access not
        assert await _refused(member, holder, "manifest", manifest) == "not_member"
