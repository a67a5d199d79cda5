"""The DHT between real nodes on 127.0.0.1: routing, put/get, sub-keys, ownership,
expiry, size bounds, persistence and rejoining after a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
from conftest import wait_until
from dht_helpers import FakeClock, chain, dht_of, fast_config, loopback, started

from gossamer.dht import (
    DHT,
    MAX_RECORD_BYTES,
    Entry,
    InvalidRecord,
    RecordTooLarge,
)
from gossamer.dht._records import make_entry
from gossamer.dht._routing import key_id, peer_key
from gossamer.node import Identity, Node, RemoteError


def _storers(nodes: list[Node], key: str) -> list[Node]:
    return [n for n in nodes if dht_of(n).store.get(key, time.time())]


async def test_routing_tables_fill_from_connections_alone(tmp_path: Path) -> None:
    # Each node dials only its predecessor; nobody calls add_peer.  Production
    # join settings: own-id lookup, bucket refreshes, peer record.
    config = fast_config(refresh_buckets_on_join=True, publish_peer_record=True)
    async with chain(tmp_path, 6, config) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 5 for n in nodes), 15, what="full tables"
        )
        for node in nodes:
            assert dht_of(node).node is node  # attached to its node
            for other in nodes:
                if other is not node:
                    contact = dht_of(node).table.get(other.peer_id)
                    assert contact is not None and contact.addrs, "contact without addresses"


async def test_put_get_when_the_getter_never_met_the_storer(tmp_path: Path) -> None:
    # Only the two nodes nearest the key store it.
    config = fast_config(replicas=2)
    async with chain(tmp_path, 6, config) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 5 for n in nodes), 15, what="full tables"
        )
        key = "/gossamer/test/not-connected"
        stored = await dht_of(nodes[0]).put(key, {"answer": 42}, time.time() + 60)
        assert stored == 2
        storers = _storers(nodes, key)
        assert len(storers) == 2
        relay = next(n for n in nodes if n not in storers)
        # A fresh node that only knows `relay` and has not looked anything up yet.
        quiet = fast_config(replicas=2, bootstrap_on_join=False)
        async with started(tmp_path / "getter", quiet) as getter:
            await getter.connect(relay.addrs()[0])
            await wait_until(
                lambda: relay.peer_id in dht_of(getter).table, 5, what="getter knows relay"
            )
            assert not any(getter.is_connected(s.peer_id) for s in storers)
            record = await dht_of(getter).get(key)
            assert record is not None and record.value == {"answer": 42}
            assert record.items[""].signer == nodes[0].peer_id
            # It reached a storer through addresses learned in the lookup.
            assert any(getter.is_connected(s.peer_id) for s in storers)


async def test_concurrent_subkey_writers_merge_on_every_replica(tmp_path: Path) -> None:
    async with chain(tmp_path, 5) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 4 for n in nodes), 15, what="full tables"
        )
        key = "/gossamer/run/r1/members"
        expires = time.time() + 60
        async with trio.open_nursery() as nursery:
            # Each writer owns the sub-key named after itself...
            for node in nodes[:4]:
                nursery.start_soon(
                    dht_of(node).put, key, {"joined": node.peer_id[-4:]}, expires, node.peer_id
                )
            # ...and two writers race on one shared sub-key.
            nursery.start_soon(dht_of(nodes[0]).put, key, "from-0", expires, "shared")
            nursery.start_soon(dht_of(nodes[1]).put, key, "from-1", expires, "shared")
        record = await dht_of(nodes[4]).get(key)
        assert record is not None
        assert set(record.subkeys) == {n.peer_id for n in nodes[:4]} | {"shared"}
        for node in nodes[:4]:
            assert record.subkeys[node.peer_id].value == {"joined": node.peer_id[-4:]}
            assert record.subkeys[node.peer_id].signer == node.peer_id
        winner = record.subkeys["shared"].value
        assert winner in ("from-0", "from-1")
        # Every replica settled on the same winner for the contested sub-key.
        now = time.time()
        held = {dht_of(n).store.get(key, now)["shared"].value for n in _storers(nodes, key)}
        assert len(held) == 1
        # A newer write replaces the old value for that sub-key everywhere.
        await dht_of(nodes[2]).put(key, "later", time.time() + 60, "shared")
        record = await dht_of(nodes[3]).get(key)
        assert record is not None and record.subkeys["shared"].value == "later"


async def test_expired_records_are_never_returned_and_are_purged(tmp_path: Path) -> None:
    config = fast_config(purge_interval=0.1)
    clock = FakeClock()  # every node's: the record expires when the clock moves, not by sleeping
    async with chain(tmp_path, 3, config, clock) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 2 for n in nodes), 15, what="full tables"
        )
        key = "/gossamer/test/short-lived"
        await dht_of(nodes[0]).put(key, "soon gone", clock() + 0.6)
        await dht_of(nodes[0]).put(key, "stays", clock() + 60, "keeper")
        record = await dht_of(nodes[2]).get(key)
        assert record is not None and record.value == "soon gone"
        clock.advance(0.7)
        record = await dht_of(nodes[2]).get(key)
        assert record is not None and record.value is None
        assert set(record.subkeys) == {"keeper"}
        # A purge cycle (every 0.1 s) drops the expired sub-key from every store.
        await wait_until(
            lambda: all(dht_of(node).store.stored(key, "") is None for node in nodes),
            5,
            what="the expired sub-key purged everywhere",
        )
        with pytest.raises(InvalidRecord, match="expired"):
            await dht_of(nodes[0]).put(key, "already dead", clock() - 1)


async def test_forged_owner_records_are_refused_everywhere(tmp_path: Path) -> None:
    async with chain(tmp_path, 4) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 3 for n in nodes), 15, what="full tables"
        )
        victim = nodes[0]
        key = f"/gossamer/profile/{victim.peer_id}"
        await dht_of(victim).put(key, {"addrs": ["genuine"]}, time.time() + 60)
        attacker_identity = Identity.generate()
        now = time.time()
        forged = [
            # unsigned, newer than the genuine one
            make_entry(key, {"addrs": ["evil"]}, ts=now + 1, expires_at=now + 60),
            # signed by the wrong key
            make_entry(
                key,
                {"addrs": ["evil"]},
                ts=now + 1,
                expires_at=now + 60,
                identity=attacker_identity,
            ),
        ]
        genuine = make_entry(
            key, {"addrs": ["x"]}, ts=now + 1, expires_at=now + 60, identity=victim.identity
        )
        # signer claims to be the victim, signature from a valid entry, value swapped
        forged.append(
            Entry("", forged[0].value, genuine.ts, genuine.expires_at, victim.peer_id, genuine.sig)
        )
        # a sub-key naming the victim, written by someone else
        forged_sub = make_entry(
            "/gossamer/run/r1/members",
            "evil",
            ts=now,
            expires_at=now + 60,
            subkey=victim.peer_id,
            identity=attacker_identity,
        )
        for storer in nodes[1:]:
            sender = nodes[1] if storer is not nodes[1] else nodes[2]
            for entry, target_key in [(e, key) for e in forged] + [
                (forged_sub, "/gossamer/run/r1/members")
            ]:
                with pytest.raises(RemoteError) as caught:
                    await sender.call(
                        storer.peer_id,
                        "dht",
                        "store",
                        {"key": target_key, "entries": [entry.encode()]},
                    )
                assert caught.value.code in ("not_owner", "bad_signature")
        # The API refuses to publish what would be refused.
        with pytest.raises(InvalidRecord, match="must be signed"):
            await dht_of(nodes[1]).put(key, {"addrs": ["evil"]}, time.time() + 60)
        # A storer that kept a forgery anyway (bypassing its own checks) cannot
        # make a getter return it.
        dht_of(nodes[2]).store.put(key, forged[0], nodes[3].peer_id, time.time())
        record = await dht_of(nodes[3]).get(key)
        assert record is not None and record.value == {"addrs": ["genuine"]}


async def test_oversize_records_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    async with chain(tmp_path, 2) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 1 for n in nodes), 15, what="full tables"
        )
        big = b"x" * (MAX_RECORD_BYTES + 1)
        with pytest.raises(RecordTooLarge, match=f"the limit is {MAX_RECORD_BYTES} bytes"):
            await dht_of(nodes[0]).put("/gossamer/test/big", big, time.time() + 60)
        # Just under the limit is fine.
        ok = b"x" * (MAX_RECORD_BYTES - 1024)
        assert await dht_of(nodes[0]).put("/gossamer/test/ok", ok, time.time() + 60) >= 1
        # A peer that sends one anyway is refused by the storer.
        now = time.time()
        entry = Entry("", b"\xc6" + len(big).to_bytes(4, "big") + big, now, now + 60)
        with pytest.raises(RemoteError) as caught:
            await nodes[0].call(
                nodes[1].peer_id,
                "dht",
                "store",
                {"key": "/gossamer/test/big", "entries": [entry.encode()]},
            )
        assert caught.value.code == "too_large"


async def test_records_survive_a_restart(tmp_path: Path) -> None:
    key_stored, key_own = "/gossamer/test/stored-by-b", "/gossamer/test/own-of-a"
    config = fast_config()
    async with started(tmp_path / "a", config) as a, started(tmp_path / "b", config) as b:
        await a.connect(b.addrs()[0])
        await wait_until(
            lambda: len(dht_of(a).table) == 1 and len(dht_of(b).table) == 1, 5, what="tables"
        )
        await dht_of(a).put(key_stored, "kept by b", time.time() + 60)
        await dht_of(b).put(key_own, "b's own", time.time() + 60, "sub")
        await wait_until(
            lambda: dht_of(b).store.get(key_stored, time.time()), 5, what="b stores it"
        )
    # b alone, restarted from the same data dir: what it stored and what it owns.
    async with started(tmp_path / "b", config) as b:
        record = await dht_of(b).get(key_stored, latest=False)
        assert record is not None and record.value == "kept by b"
        assert (key_own, "sub") in dht_of(b)._own
        record = await dht_of(b).get(key_own, latest=False)
        assert record is not None and record.subkeys["sub"].value == "b's own"


async def test_restarted_node_rejoins_and_is_found(tmp_path: Path) -> None:
    config = fast_config(publish_peer_record=True)
    async with chain(tmp_path, 5, config) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 4 for n in nodes), 15, what="full tables"
        )
        # Node "x" knew the whole swarm; then it stopped.
        async with started(tmp_path / "x", config) as x:
            x_id = x.peer_id
            await x.connect(nodes[2].addrs()[0])
            await wait_until(lambda: len(dht_of(x).table) == 5, 15, what="x joined")
            old_addrs = set(x.addrs())
        # Back with the same identity on a new port and no bootstrap address: it
        # greets one contact it saved, and nodes it never dialed can find it.
        rejoin = fast_config(reconnect_saved_contacts=1, bootstrap_on_join=False)
        async with started(tmp_path / "x", rejoin) as x:
            assert x.peer_id == x_id
            assert set(x.addrs()).isdisjoint(old_addrs)
            await wait_until(
                lambda: len(dht_of(x).table) >= 1, 10, what="x greeted a saved contact"
            )
            finder = next(n for n in nodes if not n.is_connected(x_id))

            # x's new peer record reaches the nodes near its key a moment after the greeting;
            # until then a lookup may still answer the record of x's previous run.
            async def new_addrs_found() -> list[str] | None:
                addrs = await dht_of(finder).find_peer(x_id)
                return addrs if addrs and set(addrs) & set(x.addrs()) else None

            addrs = await wait_until(
                new_addrs_found, 10, interval=0.1, what="x's new peer record found"
            )
            assert addrs is not None and set(addrs) & set(x.addrs())
            await finder.ensure_connected(x_id)
            assert finder.is_connected(x_id)


async def test_providers_are_deduplicated_and_carry_addresses(tmp_path: Path) -> None:
    async with chain(tmp_path, 4) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 3 for n in nodes), 15, what="full tables"
        )
        cid = "sha256-" + "ab" * 32
        for _ in range(2):  # announcing twice still yields one provider per peer
            await dht_of(nodes[0]).provide(cid)
        await dht_of(nodes[1]).provide(cid)
        providers = await dht_of(nodes[3]).find_providers(cid)
        assert sorted(p.peer_id for p in providers) == sorted([nodes[0].peer_id, nodes[1].peer_id])
        for provider in providers:
            assert provider.addrs and all(a.endswith(provider.peer_id) for a in provider.addrs)
        assert await dht_of(nodes[3]).find_providers("sha256-nothing") == []


async def test_dead_peers_are_evicted_and_lookups_route_around_them(tmp_path: Path) -> None:
    config = fast_config(replicas=2)
    async with chain(tmp_path, 6, config) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 5 for n in nodes), 15, what="full tables"
        )
        key = "/gossamer/test/churn"
        await dht_of(nodes[0]).put(key, "still here", time.time() + 60)
        storers = _storers(nodes, key)
        assert len(storers) == 2
        victim = storers[0]
        getter = next(n for n in nodes if n not in storers)
        await nodes.kill(victim)  # without a word to anyone
        record = await dht_of(getter).get(key)
        assert record is not None and record.value == "still here"
        # Whoever tried the dead storer dropped it from its routing table (a
        # refused connection) or holds it as failed once (a timeout; a second
        # failure evicts).
        contact = dht_of(getter).table.get(victim.peer_id)
        assert contact is None or contact.failures > 0


def test_keyspace_is_sha256_of_the_key_and_peer_id() -> None:
    import hashlib

    import base58

    pid = Identity.generate().peer_id
    assert peer_key(pid) == int.from_bytes(hashlib.sha256(base58.b58decode(pid)).digest(), "big")
    assert key_id("/gossamer/a/b") == int.from_bytes(
        hashlib.sha256(b"/gossamer/a/b").digest(), "big"
    )


async def test_a_lone_node_stores_locally_and_is_attached(tmp_path: Path) -> None:
    async with Node(loopback(tmp_path / "solo")) as node, DHT(node, fast_config()) as dht:
        assert dht_of(node) is dht  # type: ignore[attr-defined]
        assert await dht.put("/gossamer/test/solo", 1, time.time() + 5) == 1
        record = await dht.get("/gossamer/test/solo")
        assert record is not None and record.value == 1
        assert await dht.find_peer(node.peer_id) == list(dht.own_addrs())


async def test_owners_republish_what_the_network_lost(tmp_path: Path) -> None:
    config = fast_config(republish_interval=0.3)
    async with chain(tmp_path, 3, config) as nodes:
        await wait_until(
            lambda: all(len(dht_of(n).table) == 2 for n in nodes), 15, what="full tables"
        )
        key = "/gossamer/test/republished"
        await dht_of(nodes[0]).put(key, "keep me", time.time() + 60)
        for node in nodes[1:]:  # the replicas forget it (restarted without their disk)
            dht_of(node).store._remove(key, "")
        await wait_until(
            lambda: all(dht_of(n).store.get(key, time.time()) for n in nodes[1:]),
            5,
            what="republish",
        )
