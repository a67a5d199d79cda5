"""Run documents replicated between real nodes on 127.0.0.1."""

from __future__ import annotations

import random

import msgpack
import pytest
import trio
from conftest import wait_until
from crdt_helpers import crdt_nodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from gossamer.crdt import CrdtService, Envelope, RunAccessError, SyncOptions, WriteError
from gossamer.crdt.envelope import client_id_for
from gossamer.crdt.protocol import ENVELOPE, PROTOCOL, hello_message
from gossamer.node import wire


async def converged(runs, timeout: float = 10.0) -> None:
    """Wait until every replica holds the same document."""

    def same_fingerprint() -> bool:
        prints = [r.replica.fingerprint() for r in runs]
        return all(p == prints[0] for p in prints)

    await wait_until(same_fingerprint, timeout, what="one fingerprint")


def addr(service: CrdtService) -> str:
    return service.node.addrs()[0]


async def test_five_nodes_converge_with_concurrent_conflicting_edits(node_config):
    async with crdt_nodes([node_config() for _ in range(5)]) as services:
        host = await services[0].host_run("tiny", hosts=[services[1].node.peer_id])
        runs = [host] + [
            await s.join_run(host.run_id, bootstrap=[addr(services[0])]) for s in services[1:]
        ]
        await converged(runs)

        async def edits(i: int) -> None:
            doc = runs[i].doc
            for step in range(5):
                doc.enter_round(step + i, "training")
                doc.report_metrics(step=step, loss=1.0 / (step + 1), tokens=1000 * step)
                doc.serve_expert(step % 2, serving=(step + i) % 3 != 0)
                if doc.is_host():
                    doc.set_config(hparams={"lr": i, "step": step})
                await trio.sleep(random.uniform(0, 0.02))

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(edits, i)
        await converged(runs)
        round_view = runs[0].doc.round()
        assert round_view.step == 8
        assert list(round_view.participants) == [services[4].node.peer_id]
        assert all(r.doc.config() == runs[0].doc.config() for r in runs)
        assert len(runs[0].doc.members()) == 5
        # Pushes travel over the mesh: the author sends to its links, not to everyone.
        assert all(len(r.linked_peers()) >= 1 for r in runs)
        assert sum(r.stats["refused"] for r in runs) == 0


async def test_partition_heals_with_anti_entropy(node_config):
    options = SyncOptions(anti_entropy_interval=0, maintain_interval=0.1, heartbeat_interval=0)
    async with crdt_nodes([node_config() for _ in range(4)], options) as services:
        host = await services[0].host_run("split")
        runs = [host] + [
            await s.join_run(host.run_id, bootstrap=[addr(services[0])]) for s in services[1:]
        ]
        await converged(runs)
        sides = {s.node.peer_id: i % 2 for i, s in enumerate(services)}
        for s in services:
            mine = sides[s.node.peer_id]
            s.set_peer_filter(lambda p, mine=mine: sides.get(p) == mine)
        for i, run in enumerate(runs):
            run.doc.report_metrics(step=i, loss=float(i))
        # Proof that the reports went out: each reaches the other member of its side
        # (a node links to every member it may talk to, and a link sends what its
        # peer lacks).  A report let through the partition would travel the same way.
        await wait_until(
            lambda: all(len(r.doc.metrics()) >= 2 for r in runs), what="reports within each side"
        )
        assert runs[0].replica.fingerprint() != runs[1].replica.fingerprint()
        for s in services:
            s.set_peer_filter(None)
        for run in runs:
            await run.anti_entropy_once(timeout=5)
        await converged(runs, timeout=5)
        assert len(runs[0].doc.metrics()) == 4


async def test_restricted_run_refuses_an_outsider(node_config):
    async with crdt_nodes([node_config() for _ in range(3)]) as (host_s, member_s, outsider_s):
        host = await host_s.host_run(
            "closed", access="restricted", allow=[member_s.node.peer_id], config={"model": "m"}
        )
        member = await member_s.join_run(host.run_id, bootstrap=[addr(host_s)])
        await converged([host, member])
        assert member.doc.config().model == "m"
        with pytest.raises(RunAccessError):
            await outsider_s.join_run(host.run_id, bootstrap=[addr(host_s)], timeout=5)
        assert outsider_s.runs == {}
        assert not (outsider_s.root / host.run_id / "charter.bin").exists()
        # A raw hello gets an error and nothing else; a pushed envelope is never read.
        stream = await outsider_s.node.open_stream(host_s.node.peer_id, PROTOCOL)
        await stream.write(hello_message(host.run_id, None, {}))
        reply = await wire.FrameReader(stream).read_frame(1 << 16)
        assert reply is not None and wire.unpack(reply)[:2] == [6, "not_admitted"]
        await stream.close()
        assert outsider_s.node.peer_id not in host.doc.members()


async def test_forged_updates_are_refused_and_the_sender_banned(node_config):
    async with crdt_nodes([node_config() for _ in range(2)]) as (host_s, evil_s):
        host = await host_s.host_run("tiny")
        evil = await evil_s.join_run(host.run_id, bootstrap=[addr(host_s)])
        await converged([host, evil])
        host_id, evil_id = host_s.node.peer_id, evil_s.node.peer_id
        link = evil.link_for(host_id)
        assert link is not None
        # 1. Writing the host's member record, properly signed by the evil node.
        doc = Doc(client_id=client_id_for(evil_s.node.identity.public_key_bytes))
        doc.apply_update(evil.replica.doc.get_update())
        updates: list[bytes] = []
        doc.observe(lambda event: updates.append(event.update))
        with doc.transaction():
            doc.get("members", type=Map)[host_id] = wire.pack({"addrs": ["/ip4/6.6.6.6/tcp/6"]})
        forged = Envelope.sign(evil_s.node.identity, host.run_id, updates[0])
        link.send_envelope(forged)
        # 2. A forged signature on an otherwise valid update.
        legit = evil.doc.report_metrics(step=1, loss=0.5)
        link.send_raw(wire.frame(wire.pack([ENVELOPE, legit.author, bytes(64), legit.update])))
        await wait_until(
            lambda: host_s.is_banned(evil_id), 5, interval=0.02, what="the forger banned"
        )
        assert host.doc.member(host_id).addrs == tuple(host_s.node.addrs())
        assert host.stats["refused"] >= 1
        assert evil_id not in host.linked_peers()


async def test_persistence_across_restart(node_config):
    host_config, member_config = node_config("host"), node_config("member")
    async with crdt_nodes([host_config]) as (host_s,):
        host = await host_s.host_run("tiny", config={"model": "v1"})
        async with crdt_nodes([member_config]) as (member_s,):
            member = await member_s.join_run(host.run_id, bootstrap=[addr(host_s)])
            member.doc.report_metrics(step=7, loss=0.25, tokens=123)
            await converged([host, member])
            member_id = member_s.node.peer_id
        host.doc.set_config(model="v2")
        async with crdt_nodes([member_config]) as (member_s,):
            # Reloaded from disk before any network traffic ...
            reopened = member_s.runs[host.run_id]
            assert reopened.doc.metrics()[member_id].tokens == 123
            assert reopened.doc.config().model == "v1"
            # ... then caught up from the host (whose address is in the document).
            await reopened.wait_for(lambda doc: doc.config().model == "v2", timeout=10)
            reopened.doc.report_metrics(step=8, loss=0.2, tokens=200)
            await converged([host, reopened])


async def test_five_megabyte_update_syncs(node_config):
    blob = random.Random(1).randbytes(5 * 1024 * 1024)
    async with crdt_nodes([node_config() for _ in range(3)]) as (a, b, c):
        host = await a.host_run("big")
        early = await b.join_run(host.run_id, bootstrap=[addr(a)])
        host.doc.set_config(weights=blob)
        await early.wait_for(lambda doc: doc.config().get("weights") == blob, timeout=20)
        late = await c.join_run(host.run_id, bootstrap=[addr(b)])  # via a member, not the host
        await late.wait_for(lambda doc: doc.config().get("weights") == blob, timeout=20)


# ------------------------------------------------------------------ fuzzing

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.binary(max_size=80),
    st.text(max_size=20),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.integers(0, 2**53) | st.text(max_size=5), inner, max_size=5),
    ),
    max_leaves=12,
)


def _message(kind_and_fields):
    kind, fields = kind_and_fields
    return wire.frame(msgpack.packb([kind, *fields], use_bin_type=True))


_frames = st.one_of(
    st.binary(max_size=120).map(wire.frame),  # arbitrary bytes in a frame
    st.tuples(st.integers(-2, 9), st.lists(_values, max_size=4)).map(_message),
    st.tuples(
        st.just(ENVELOPE),
        st.tuples(
            st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
            st.binary(min_size=64, max_size=64),
            st.binary(max_size=120),
        ),
    ).map(_message),
    st.tuples(
        st.sampled_from([2, 3]),
        st.tuples(st.integers(0, 10), st.dictionaries(_scalars, _scalars, max_size=4)),
    ).map(_message),
    st.binary(max_size=16).map(lambda b: wire.LENGTH.pack(1 << 30) + b),  # oversize claim
)


# The node's own tasks use `random` while hypothesis runs in a worker thread.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
async def test_malformed_sync_messages_never_crash_the_node(node_config):
    options = SyncOptions(
        anti_entropy_interval=0, maintain_interval=0.1, heartbeat_interval=0, ban_seconds=0
    )
    async with crdt_nodes([node_config() for _ in range(3)], options) as (victim_s, fuzz_s, good_s):
        victim = await victim_s.host_run("fuzzed")
        victim_id = victim_s.node.peer_id
        await fuzz_s.node.connect(addr(victim_s))
        run_id = victim.run_id

        async def send(with_hello: bool, frames: list[bytes]) -> None:
            try:
                stream = await fuzz_s.node.open_stream(victim_id, PROTOCOL)
            except Exception:
                return
            try:
                with trio.move_on_after(0.5):
                    if with_hello:
                        await stream.write(hello_message(run_id, None, {}))
                    for frame in frames:
                        await stream.write(frame)
                    await stream.close()  # end of our side: the victim sees EOF
                    reader = wire.FrameReader(stream)
                    while await reader.read_frame(64 << 20) is not None:
                        pass
            except (ConnectionError, EOFError, Exception):
                pass
            finally:
                await stream.reset()

        @settings(
            max_examples=60,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(with_hello=st.booleans(), frames=st.lists(_frames, min_size=1, max_size=4))
        def fuzz(with_hello, frames):
            trio.from_thread.run(send, with_hello, frames)

        await trio.to_thread.run_sync(fuzz)
        # Still alive and still syncing with an honest peer.
        assert await fuzz_s.node.ping(victim_id) > 0
        good = await good_s.join_run(run_id, bootstrap=[addr(victim_s)])
        victim.doc.set_config(model="still here")
        await good.wait_for(lambda doc: doc.config().model == "still here", timeout=5)
        await victim.wait_for(lambda doc: good_s.node.peer_id in doc.members(), timeout=5)
        assert victim.doc.members().keys() == {victim_id, good_s.node.peer_id}


async def test_charter_amendment_removes_a_member(node_config):
    async with crdt_nodes([node_config() for _ in range(2)]) as (host_s, member_s):
        member_id = member_s.node.peer_id
        host = await host_s.host_run("closing", access="restricted", allow=[member_id])
        member = await member_s.join_run(host.run_id, bootstrap=[addr(host_s)])
        await converged([host, member])
        host.update_charter(host.charter.amend(host_s.node.identity, allow=[]))
        await member.wait_for(lambda doc: doc.charter.version == 2, timeout=5)
        await wait_until(
            lambda: not host.linked_peers(), 5, interval=0.02, what="the removed member unlinked"
        )
        with pytest.raises(WriteError, match="not admitted"):
            member.doc.report_metrics(step=1)


async def test_members_found_through_the_dht(node_config):
    from gossamer.dht import DHT

    async with crdt_nodes([node_config() for _ in range(3)]) as (host_s, relay_s, joiner_s):
        for service in (host_s, relay_s, joiner_s):
            await DHT.start(service.node)
        await host_s.node.connect(addr(relay_s))
        await joiner_s.node.connect(addr(relay_s))

        def table_size(service: CrdtService) -> int:
            dht = service.node.service(DHT)
            return 0 if dht is None else len(dht.table)

        # the run is announced and looked up through the relay's DHT: it must know both
        await wait_until(
            lambda: (
                table_size(relay_s) == 2 and table_size(host_s) >= 1 and table_size(joiner_s) >= 1
            ),
            what="DHT routing tables through the relay",
        )
        host = await host_s.host_run("found")  # announces the run in the DHT
        joined = await joiner_s.join_run(host.run_id, timeout=10)  # no bootstrap address
        await converged([host, joined])
        assert host_s.node.peer_id in joined.doc.members()
