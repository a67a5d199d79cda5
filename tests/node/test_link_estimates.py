"""Deadlines from measurement: the data plane's link estimates (pure) and what they feed."""

import pytest
import torch

from gossamer.node import DeadlinePolicy, LinkEstimates, LinkShape
from gossamer.node.dataplane.links import BULK_BYTES, MAX_PEERS

torch.set_num_threads(1)


def test_small_transfers_measure_the_round_trip_and_bulk_ones_the_rate():
    links = LinkEstimates()
    assert links.seconds_for("p", 10**6) is None  # nothing measured: no guess
    links.observe("p", 1000, 0.1, now=0.0)
    assert links.rtt("p") == pytest.approx(0.1)
    assert links.seconds_for("p", 10**6) is None  # a round trip says nothing of the rate
    links.observe("p", 10_000_000, 1.1, now=1.0)  # 10 MB in 1 s beyond the round trip
    assert links.seconds_for("p", 20_000_000) == pytest.approx(0.1 + 2.0)
    snap = links.snapshot()["p"]
    assert snap["mbit_s"] == pytest.approx(80.0)
    assert snap["rtt_ms"] == pytest.approx(100.0)


def test_estimates_follow_a_link_that_slows_down():
    links = LinkEstimates()
    for t in range(5):
        links.observe("p", BULK_BYTES * 4, 0.01, now=t)
    fast = links.seconds_for("p", 10**7)
    for t in range(5, 15):
        links.observe("p", BULK_BYTES * 4, 0.1, now=t)
    assert links.seconds_for("p", 10**7) > 8 * fast


def test_garbage_samples_are_ignored_and_memory_is_bounded():
    links = LinkEstimates()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        links.observe("p", 10**6, bad, now=0.0)
    assert links.get("p") is None
    for i in range(MAX_PEERS + 10):
        links.observe(f"p{i}", 100, 0.01, now=float(i))
    assert len(links.snapshot()) == MAX_PEERS
    assert links.get("p0") is None and links.get(f"p{MAX_PEERS + 9}") is not None


def test_deadline_policy_bounds_and_the_unknown_case():
    policy = DeadlinePolicy(floor=2.0, ceiling=60.0, safety=3.0)
    assert policy.deadline(None) == 60.0  # nothing measured: the ceiling
    assert policy.deadline(0.01) == 2.0
    assert policy.deadline(5.0) == 15.0
    assert policy.deadline(100.0) == 60.0
    # transfers that run together wait for the slowest measured one; unmeasured ones are
    # taken to be like the others
    assert policy.worst([1.0, None, 4.0]) == 12.0
    assert policy.worst([None, None]) == 60.0
    for bad in ({"floor": 0}, {"floor": 5, "ceiling": 1}, {"safety": 0.5}):
        with pytest.raises(ValueError):
            DeadlinePolicy(**bad)


async def test_the_data_plane_measures_a_shaped_link(node_config):
    from conftest import running_nodes

    configs = [node_config(shape=LinkShape(up_mbit=40, latency_ms=20)), node_config()]
    async with running_nodes(configs) as (a, b):
        await a.connect(b.addrs()[0])
        for i in range(3):
            got = b.dataplane.post_recv(a.peer_id, f"m{i}")
            await a.dataplane.send(b.peer_id, f"m{i}", {"x": torch.zeros(2_000_000 // 4)})
            await got.wait(30)
        estimate = a.dataplane.links.get(b.peer_id)
        assert estimate is not None and estimate.seconds_per_byte is not None
        # the link gives at most 40 Mbit/s: what was measured cannot be faster
        assert 8 / estimate.seconds_per_byte / 1e6 <= 40 * 1.05
        assert a.dataplane.links.seconds_for(b.peer_id, 5_000_000) >= 1.0
