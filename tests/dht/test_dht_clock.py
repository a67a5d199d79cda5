"""The DHT on an injected clock: expiry, republishing, TTLs and contact times follow
``DHT(clock=...)``, so these tests move time forward instead of sleeping.

The fake clock starts in 2001, far from the real time: a site still reading
``time.time()`` would see every record here as long expired and fail the test.
"""

from __future__ import annotations

from pathlib import Path

from conftest import wait_until
from dht_helpers import START, FakeClock, dht_of, fast_config, loopback

from gossamer.dht import DHT, DHTConfig
from gossamer.node import Node


def solo_config(**overrides: object) -> DHTConfig:
    # No background purge or flush while a test holds the clock still.
    values: dict[str, object] = {"purge_interval": 3600.0, "flush_interval": 3600.0}
    values.update(overrides)
    return fast_config(**values)


async def test_a_record_expires_exactly_when_the_clock_reaches_its_expiry(tmp_path: Path) -> None:
    clock = FakeClock()
    key = "/gossamer/test/ttl"
    async with (
        Node(loopback(tmp_path / "solo")) as node,
        DHT(node, solo_config(), clock=clock) as dht,
    ):
        assert await dht.put(key, "v", clock() + 60) == 1
        entries, _ = dht.serve_find_value(key, caller="someone")
        assert [e.expires_at for e in entries] == [START + 60]
        assert entries[0].ts == START  # signed with the injected time

        clock.advance(59.999)
        record = await dht.get(key)
        assert record is not None and record.value == "v"
        assert dht.serve_find_value(key, caller="someone")[0]

        clock.advance(0.001)  # now == expires_at: gone, for us and for whoever asks
        assert await dht.get(key) is None
        assert dht.serve_find_value(key, caller="someone")[0] == []
        assert len(dht.store) == 0


async def test_republish_restores_own_records_only_until_they_expire(tmp_path: Path) -> None:
    clock = FakeClock()
    key = "/gossamer/test/republished"
    async with (
        Node(loopback(tmp_path / "solo")) as node,
        DHT(node, solo_config(), clock=clock) as dht,
    ):
        await dht.put(key, "keep me", clock() + 120)
        signed = dht.serve_find_value(key, caller="someone")[0]

        dht.store.purge(clock() + 1000)  # the replicas lost it
        assert len(dht.store) == 0
        clock.advance(119)
        await dht.republish()
        assert dht.serve_find_value(key, caller="someone")[0] == signed  # the same signed entry

        dht.store.purge(clock() + 1000)
        clock.advance(1)  # our own copy has expired too: nothing left to republish
        await dht.republish()
        assert len(dht.store) == 0
        assert await dht.get(key) is None


async def test_ttls_are_counted_from_the_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    async with (
        Node(loopback(tmp_path / "solo")) as node,
        DHT(node, solo_config(), clock=clock) as dht,
    ):
        await dht.provide("some-content", ttl=100)
        providers = await dht.find_providers("some-content")
        assert [(p.peer_id, p.expires_at) for p in providers] == [(node.peer_id, START + 100)]

        clock.advance(5)
        # The control API's put (the CLI's) takes a ttl relative to the same clock.
        result = await node.control_methods["dht.put"](
            {"key": "/gossamer/test/cli", "value": 1, "ttl": 30}
        )
        assert result["stored"] == 1
        record = await dht.get("/gossamer/test/cli")
        assert record is not None and record.expires_at == START + 35


async def test_persisted_records_left_over_past_their_expiry_are_not_loaded(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    config = solo_config()  # what a node holds reaches the disk when it stops
    key_short, key_long = "/gossamer/test/short", "/gossamer/test/long"
    async with Node(loopback(tmp_path / "solo")) as node, DHT(node, config, clock=clock) as dht:
        await dht.put(key_short, "short", clock() + 10)
        await dht.put(key_long, "long", clock() + 1000)
    clock.advance(10)  # the node was down while the short one expired
    async with Node(loopback(tmp_path / "solo")) as node, DHT(node, config, clock=clock) as dht:
        assert await dht.get(key_short, latest=False) is None
        record = await dht.get(key_long, latest=False)
        assert record is not None and record.value == "long"


async def test_contacts_are_seen_at_the_injected_time(tmp_path: Path) -> None:
    clock = FakeClock()
    config = solo_config()
    async with (
        Node(loopback(tmp_path / "a")) as a,
        Node(loopback(tmp_path / "b")) as b,
        DHT(a, config, clock=clock),
        DHT(b, config, clock=clock),
    ):
        await a.connect(b.addrs()[0])
        await wait_until(
            lambda: b.peer_id in dht_of(a).table, 5, interval=0.01, what="the hello: b in a's table"
        )
        contact = dht_of(a).table.get(b.peer_id)
        assert contact is not None and contact.last_seen == START
