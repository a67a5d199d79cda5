"""Routing table, lookup state machine and adaptive deadlines, without a network.

The lookup is driven here by a simulated swarm (each peer answers from its
own routing table), which is exactly what the trio driver does with RPCs.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.dht._lookup import Lookup
from gossamer.dht._routing import RoutingTable, bucket_index, peer_key
from gossamer.dht._rtt import RttEstimator
from gossamer.node import Identity


def peer_ids(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [Identity(rng.randbytes(32)).peer_id for _ in range(count)]


PEERS = peer_ids(300)


# ------------------------------------------------------------- routing table


def test_closest_matches_brute_force_and_buckets_respect_k() -> None:
    table = RoutingTable(PEERS[0], k=5)
    for i, pid in enumerate(PEERS[1:]):
        table.update(pid, (f"/ip4/127.0.0.1/tcp/{i}",), float(i))
    assert all(size <= 5 for size in table.bucket_sizes().values())
    target = peer_key(PEERS[7])
    brute = sorted(table.peers(), key=lambda c: c.id ^ target)[:5]
    assert [c.peer_id for c in table.closest(target, 5)] == [c.peer_id for c in brute]
    for contact in table.peers():
        assert bucket_index(table.self_id, contact.id) >= 0


def test_full_bucket_parks_newcomers_and_promotes_them_on_eviction() -> None:
    table = RoutingTable(PEERS[0], k=2, max_failures=2)
    top = [p for p in PEERS[1:] if bucket_index(table.self_id, peer_key(p)) == 255][:4]
    for i, pid in enumerate(top):
        table.update(pid, ("/ip4/127.0.0.1/tcp/1",), float(i))
    assert [c.peer_id for c in table.peers()] == top[:2]  # old members kept
    assert not table.record_failure(top[0])  # one timeout is forgiven
    assert table.record_failure(top[0])  # the second evicts
    assert top[0] not in table and top[3] in table  # newest replacement promoted
    assert table.record_failure(top[1], definitive=True)  # refused connection: at once
    assert top[2] in table


def test_an_answer_clears_failures_and_a_failed_member_makes_room() -> None:
    table = RoutingTable(PEERS[0], k=1)
    top = [p for p in PEERS[1:] if bucket_index(table.self_id, peer_key(p)) == 255][:2]
    table.update(top[0], (), 0.0)
    table.record_failure(top[0])
    table.update(top[1], (), 1.0)  # bucket full, but its member already failed
    assert top[1] in table and top[0] not in table


def test_stale_buckets_and_random_ids_in_them() -> None:
    table = RoutingTable(PEERS[0], k=20)
    for pid in PEERS[1:50]:
        table.update(pid, (), 0.0)
    stale = table.stale_buckets(now=1000.0, interval=600.0)
    assert stale and stale[-1] == 255
    rng = random.Random(1)
    for index in stale:
        assert bucket_index(table.self_id, table.random_id_in_bucket(index, rng)) == index
    for index in stale:
        table.mark_refreshed(table.random_id_in_bucket(index, rng), 1000.0)
    assert table.stale_buckets(now=1100.0, interval=600.0) == []


# ------------------------------------------------------------------- lookup


def simulated_swarm(count: int, k: int, seed: int) -> dict[str, RoutingTable]:
    """Each peer's table after it heard of every other peer, in a random order
    (buckets full of whoever came first, as after a while in a real swarm)."""
    rng = random.Random(seed)
    ids = PEERS[:count]
    tables = {pid: RoutingTable(pid, k=k) for pid in ids}
    for pid in ids:
        for other in rng.sample(ids, count):
            tables[pid].update(other, (), 0.0)
    return tables


def run_lookup(
    tables: dict[str, RoutingTable], start: str, target: int, k: int, dead: set[str] = frozenset()
) -> Lookup:
    seeds = [(c.peer_id, ()) for c in tables[start].closest(target, k)]
    lookup = Lookup(target, seeds, k=k, alpha=3, self_peer_id=start)
    now = 0.0
    in_flight: list[str] = []
    for _ in range(10_000):
        batch = lookup.next_queries(now)
        assert len([p for p in in_flight]) + len(batch) <= 3 or not batch
        in_flight += [p for p, _ in batch]
        if lookup.finished or not in_flight:
            break
        peer = in_flight.pop(0)  # answers arrive in order
        if peer in dead:
            lookup.on_failure(peer)
        else:
            contacts = tables[peer].closest(target, k, exclude=start)
            lookup.on_response(peer, [(c.peer_id, ()) for c in contacts])
        now += 0.001
    return lookup


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 299))
def test_lookup_converges_on_the_true_k_closest(seed: int, start_index: int) -> None:
    k = 8
    tables = simulated_swarm(120, k, seed % 7)
    start = PEERS[start_index % 120]
    target = random.Random(seed).getrandbits(256)
    lookup = run_lookup(tables, start, target, k)
    assert lookup.finished
    truth = sorted((p for p in PEERS[:120] if p != start), key=lambda p: peer_key(p) ^ target)
    assert [p for p, _ in lookup.closest(k)] == truth[:k]
    assert lookup.queries < 60  # logarithmic-ish, not a flood


def test_lookup_routes_around_dead_peers() -> None:
    k = 8
    tables = simulated_swarm(120, k, 3)
    rng = random.Random(5)
    dead = set(rng.sample(PEERS[1:120], 36))  # 30% gone without a word
    target = rng.getrandbits(256)
    lookup = run_lookup(tables, PEERS[0], target, k, dead)
    alive = sorted((p for p in PEERS[1:120] if p not in dead), key=lambda p: peer_key(p) ^ target)
    found = [p for p, _ in lookup.closest(k)]
    assert not set(found) & dead
    assert len(set(found) & set(alive[:k])) >= k - 1


def test_alpha_bounds_queries_and_stalled_ones_free_their_slot() -> None:
    seeds = [(p, ()) for p in PEERS[1:10]]
    lookup = Lookup(peer_key(PEERS[0]), seeds, k=5, alpha=2, stall_after=0.1)
    first = lookup.next_queries(0.0)
    assert len(first) == 2
    assert lookup.next_queries(0.05) == []
    assert abs(lookup.wake_in(0.05) - 0.05) < 1e-9
    stalled_extra = lookup.next_queries(0.2)  # both stalled: two more may go
    assert len(stalled_extra) == 2
    for peer, _ in first + stalled_extra:
        lookup.on_response(peer, [])
    # the window is k=5: one more, then done
    last = lookup.next_queries(0.3)
    assert len(last) == 1
    lookup.on_response(last[0][0], [])
    assert lookup.finished


def test_stop_finishes_and_failures_shift_the_window() -> None:
    seeds = [(p, ()) for p in PEERS[1:4]]
    lookup = Lookup(peer_key(PEERS[0]), seeds, k=2, alpha=3)
    batch = lookup.next_queries(0.0)
    assert len(batch) == 2  # only the k nearest are asked while they may answer
    for peer, _ in batch:
        lookup.on_failure(peer)
    assert not lookup.finished
    (third,) = lookup.next_queries(0.0)
    lookup.on_response(third[0], [])
    assert lookup.finished and [p for p, _ in lookup.closest()] == [third[0]]
    other = Lookup(peer_key(PEERS[0]), seeds, k=2)
    other.stop()
    assert other.finished and other.next_queries(0.0) == []


def test_a_failed_peer_reported_at_a_new_address_is_asked_again_once_or_twice() -> None:
    target = peer_key(PEERS[1])
    lookup = Lookup(target, [(PEERS[1], ("/old",))], k=3)
    ((peer, addrs),) = lookup.next_queries(0.0)
    assert addrs == ("/old",)
    lookup.on_failure(peer)
    lookup._add([(PEERS[1], ("/old",))])  # same address: not again
    assert lookup.finished
    lookup._add([(PEERS[1], ("/old", "/new"))])
    ((peer, addrs),) = lookup.next_queries(0.0)
    assert addrs == ("/new",)


def test_contact_floods_stay_bounded() -> None:
    lookup = Lookup(0, [], k=4, max_candidates=10)
    lookup._add([(p, ()) for p in PEERS[:200]])
    assert len(lookup._candidates) == 10


# ----------------------------------------------------------------- deadlines


def test_deadlines_follow_measured_round_trips_with_a_floor_and_a_cap() -> None:
    rtt = RttEstimator(floor=0.05, cap=2.0, dial_allowance=1.0, stall_floor=0.002)
    assert rtt.timeout("a") == 0.05 + 1.0  # never measured: first call may open a stream
    for _ in range(20):
        rtt.observe("a", 0.001)
    assert rtt.timeout("a") == 0.05  # fast peer: the floor
    for _ in range(20):
        rtt.observe("b", 1.0)
    assert 0.9 < rtt.timeout("b") <= 2.0
    assert rtt.timeout("b", connected=False) > rtt.timeout("b")
    assert rtt.stall_after() >= 0.002
    rtt.forget("b")
    assert rtt.srtt("b") is None


# ------------------------------------------------------- addresses from peers


def test_addresses_from_peers_are_checked_and_unspecified_hosts_substituted() -> None:
    from gossamer.dht._service import clean_addrs, parse_contacts

    me, other = PEERS[0], PEERS[1]
    raw = [
        "/ip4/0.0.0.0/tcp/4001",
        f"/ip4/10.0.0.5/tcp/4001/p2p/{me}",
        f"/ip4/10.0.0.6/tcp/4001/p2p/{other}",  # names someone else
        "not a multiaddr",
        "/ip4/10.0.0.5/tcp/4001",  # duplicate once suffixed
        42,
        "/" + "x" * 300,
    ]
    assert clean_addrs(me, raw, observed="/ip4/192.0.2.7/tcp/55555") == (
        f"/ip4/192.0.2.7/tcp/4001/p2p/{me}",
        f"/ip4/10.0.0.5/tcp/4001/p2p/{me}",
    )
    assert clean_addrs(me, ["/ip4/0.0.0.0/tcp/4001"]) == ()  # nothing to substitute
    assert clean_addrs(me, "nope") == ()
    contacts = parse_contacts(
        [[me, ["/ip4/10.0.0.5/tcp/1"]], ["12D3KooWfake", []], [other], "x", [other, "y"]]
    )
    assert contacts == [(me, (f"/ip4/10.0.0.5/tcp/1/p2p/{me}",)), (other, ())]


def test_a_stale_contact_is_kept_when_nobody_could_replace_it() -> None:
    table = RoutingTable(PEERS[0], k=20, max_failures=2)
    table.update(PEERS[1], (), 0.0)
    for _ in range(5):  # an overloaded moment: timeouts, no replacement waiting
        assert not table.record_failure(PEERS[1])
    assert PEERS[1] in table and table.get(PEERS[1]).failures == 5
    assert table.record_failure(PEERS[1], definitive=True)  # a refused dial is proof
    assert len(table) == 0
