"""The link shaper: its rules (pure), its config, and real bytes paced and delayed between nodes."""

import random

import pytest
import torch
import trio

from gossamer.node import load_config
from gossamer.node.errors import ConfigError
from gossamer.node.shaper import DelayLine, LinkMeter, LinkShape, Serializer

torch.set_num_threads(1)

# ------------------------------------------------------------------------------ the rules


def test_serializer_paces_bytes_back_to_back_and_idles_when_free():
    link = Serializer(80)  # 10 MB/s
    assert link.finish(0.0, 1_000_000) == pytest.approx(0.1)
    assert link.finish(0.0, 1_000_000) == pytest.approx(0.2)  # queued behind the first
    assert link.finish(5.0, 500_000) == pytest.approx(5.05)  # an idle link starts at once
    assert Serializer(0).finish(3.0, 1 << 30) == 3.0  # unlimited


def test_delay_line_adds_latency_keeps_order_under_jitter_and_resends_lost_segments():
    line = DelayLine(LinkShape(latency_ms=50), random.Random(0))
    assert line.arrival(1.0, 100) == pytest.approx(1.05)
    jittery = DelayLine(LinkShape(latency_ms=20, jitter_ms=15), random.Random(1))
    arrivals = [jittery.arrival(i * 0.001, 1000) for i in range(500)]
    assert arrivals == sorted(arrivals)  # TCP delivers in order
    assert min(a - i * 0.001 for i, a in enumerate(arrivals)) >= 0.005 - 1e-9
    lossy = DelayLine(LinkShape(latency_ms=10, loss=0.01), random.Random(2))
    delays = [lossy.arrival(float(i), 16384) - i for i in range(2000)]
    resent = sum(d > 0.011 for d in delays)
    # 12 segments per chunk: P(a chunk loses one) = 1 - 0.99^12 ≈ 11%
    assert 150 < resent < 310
    assert max(delays) == pytest.approx(0.03)  # one more round trip


def test_meter_peak_is_the_busiest_window():
    meter = LinkMeter(bin_s=0.01)
    for i in range(100):  # 1 s at 8 Mbit/s ...
        meter.add(i * 0.01, "up", 10_000)
    for i in range(10):  # ... then 0.1 s at 80 Mbit/s
        meter.add(2 + i * 0.01, "up", 100_000)
    assert meter.peak_mbit("up", window_s=1.0) == pytest.approx(8.0)
    assert meter.peak_mbit("up", window_s=0.1) == pytest.approx(80.0)
    assert meter.peak_mbit("up", window_s=0.1, since=2.5) == 0.0
    assert meter.totals["up"] == 2_000_000


# ----------------------------------------------------------------------------- the config


def test_shape_from_the_environment_and_from_node_shape(tmp_path):
    config = load_config(env={"GOSSAMER_SHAPE": "up_mbit=100, down_mbit=20 latency_ms=50"})
    assert config.shape == LinkShape(up_mbit=100, down_mbit=20, latency_ms=50)
    path = tmp_path / "node.toml"
    path.write_text("[node.shape]\nup_mbit = 100\nlatency_ms = 25\njitter_ms = 2\n")
    assert load_config(path, env={}).shape == LinkShape(up_mbit=100, latency_ms=25, jitter_ms=2)
    assert not load_config(env={}).shape.active


@pytest.mark.parametrize(
    "env, message",
    [
        ("up=100", "unknown config key 'up'"),
        ("up_mbit=fast", "up_mbit"),
        ("up_mbit=-1", "up_mbit must be"),
        ("loss=1.5", "loss must be"),
        ("latency_ms", "key=value"),
    ],
)
def test_bad_shapes_are_one_line_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env={"GOSSAMER_SHAPE": env})


def test_a_top_level_shape_table_is_refused(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text("[shape]\nup_mbit = 100\n")
    with pytest.raises(ConfigError, match=r"\[node.shape\]"):
        load_config(path, env={})


# ------------------------------------------------------------------- real bytes, real nodes


async def test_ten_megabytes_through_an_80_mbit_uplink_take_at_least_a_second(nodes, node_config):
    from conftest import running_nodes

    shaped = node_config(shape=LinkShape(up_mbit=80))
    async with running_nodes([shaped, node_config()]) as (a, b):
        await a.connect(b.addrs()[0])
        payload = {"x": torch.zeros(10_000_000, dtype=torch.uint8)}
        got = b.dataplane.post_recv(a.peer_id, "bulk")
        start = trio.current_time()
        await a.dataplane.send(b.peer_id, "bulk", payload, timeout=60)
        received = await got.wait(60)
        elapsed = trio.current_time() - start
        assert torch.equal(received.tensors["x"], payload["x"])
        assert elapsed >= 1.0  # 80 Mbit/s = 10 MB/s: a lower bound only
        stats = a.shaper.stats()
        assert stats["bytes_up"] >= 10_000_000
        assert stats["peak_up_mbit"] <= 80 * 1.01
        assert not b.shaper.active


async def test_a_shaped_downlink_holds_a_fast_sender_back(node_config):
    from conftest import running_nodes

    async with running_nodes([node_config(), node_config(shape=LinkShape(down_mbit=80))]) as (
        a,
        b,
    ):
        await a.connect(b.addrs()[0])
        got = b.dataplane.post_recv(a.peer_id, "bulk")
        start = trio.current_time()
        await a.dataplane.send(b.peer_id, "bulk", {"x": torch.ones(5_000_000)}, timeout=60)
        await got.wait(60)
        assert trio.current_time() - start >= 2.0  # 20 MB at 10 MB/s
        assert b.shaper.stats()["bytes_down"] >= 20_000_000


async def test_latency_adds_to_an_rpc_round_trip(node_config):
    from conftest import running_nodes

    configs = [node_config(shape=LinkShape(latency_ms=60)), node_config()]
    async with running_nodes(configs) as (a, b):
        await a.connect(b.addrs()[0])
        one_side = min([await a.ping(b.peer_id) for _ in range(3)])
        assert one_side >= 60  # ms: the request crosses a's link
    configs = [node_config(shape=LinkShape(latency_ms=60)) for _ in range(2)]
    async with running_nodes(configs) as (a, b):
        await a.connect(b.addrs()[0])
        both = min([await a.ping(b.peer_id) for _ in range(3)])
        assert both >= 120  # request and answer each cross a shaped link
