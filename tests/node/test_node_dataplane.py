"""The tensor data plane between real nodes: exactness, paths, tampering, limits."""

import contextlib
import os
import socket

import numpy as np
import pytest
import torch
import trio
from tcp_proxy import TcpProxy

from gossamer.node import DeadlineExceeded, TransferError
from gossamer.node.errors import ChannelClosed, IntegrityError, SpecMismatch, TruncatedTransfer

torch.set_num_threads(1)


@pytest.fixture
async def pair(nodes):
    async with nodes(2) as (a, b):
        await a.connect(b.addrs()[0])
        yield a, b


def _sample_tensors():
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, 7, generator=gen),
        "bf16": torch.randn(1000, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(17, generator=gen).half(),
        "i64": torch.randint(-(2**40), 2**40, (33,), generator=gen),
        "bool": torch.rand(9, generator=gen) > 0.5,
        "u8": torch.randint(0, 256, (4, 4), dtype=torch.uint8, generator=gen),
        "scalar": torch.tensor(3.25),
        "empty": torch.empty(0, 5),
        "np16": np.arange(11, dtype=np.float16),
        "npi32": np.arange(-5, 5, dtype=np.int32).reshape(2, 5),
        "raw": b"\x00\x01hello\xff",
        "raw_empty": b"",
    }


def _assert_same(sent, got):
    assert set(sent) == set(got)
    for name, value in sent.items():
        other = got[name]
        if isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and other.dtype == value.dtype, name
            assert other.shape == value.shape, name
            assert torch.equal(other, value), name
        elif isinstance(value, np.ndarray):
            assert other.dtype == value.dtype and other.shape == value.shape, name
            assert np.array_equal(other, value), name
        else:
            assert bytes(other) == bytes(value), name


async def test_bit_exact_many_dtypes_allocated_on_arrival(pair):
    a, b = pair
    sent = _sample_tensors()
    report = await a.dataplane.send(b.peer_id, "mixed", sent, timeout=10)
    assert report.path == "direct"
    received = await b.dataplane.recv(a.peer_id, "mixed", timeout=5)
    assert received.path == "direct" and received.peer_id == a.peer_id
    _assert_same(sent, received.tensors)


async def test_zero_copy_into_preallocated_memory(pair):
    a, b = pair
    source = {"w": torch.randn(256, 1024), "b": torch.arange(10, dtype=torch.int64)}
    target = {"w": torch.empty(256, 1024), "b": torch.empty(10, dtype=torch.int64)}
    pointers = {k: v.data_ptr() for k, v in target.items()}
    pending = b.dataplane.post_recv(a.peer_id, "pre", into=target)
    await a.dataplane.send(b.peer_id, "pre", source)
    received = await pending.wait(5)
    for name in source:
        assert received[name] is target[name]
        assert received[name].data_ptr() == pointers[name]
        assert torch.equal(target[name], source[name])


async def test_large_transfer_over_64mb_both_ways(pair):
    a, b = pair
    big = torch.arange(20 << 20, dtype=torch.float32)  # 80 MiB
    back = np.frombuffer(os.urandom(9 << 20), dtype=np.uint8)
    into = torch.empty_like(big)
    pending_b = b.dataplane.post_recv(a.peer_id, "big", into={"x": into})
    pending_a = a.dataplane.post_recv(b.peer_id, "back")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.dataplane.send, b.peer_id, "big", {"x": big})
        nursery.start_soon(b.dataplane.send, a.peer_id, "back", {"y": back})
    assert torch.equal((await pending_b.wait(10))["x"], big)
    assert np.array_equal((await pending_a.wait(10))["y"], back)


async def test_late_receiver_with_buffers_gets_a_copy(pair):
    a, b = pair
    await a.dataplane.send(b.peer_id, "early", {"v": torch.arange(5.0)})
    out = torch.zeros(5)
    received = await b.dataplane.recv(a.peer_id, "early", into={"v": out}, timeout=5)
    assert received["v"] is out and torch.equal(out, torch.arange(5.0))


async def test_any_peer_receive_and_fifo_per_tag(pair):
    a, b = pair
    for i in range(3):
        await a.dataplane.send(b.peer_id, "seq", {"i": torch.tensor([i])})
    got = [int((await b.dataplane.recv(None, "seq", timeout=5))["i"]) for _ in range(3)]
    assert got == [0, 1, 2]


async def test_mismatched_prepared_buffers_refused_both_sides(pair):
    a, b = pair
    pending = b.dataplane.post_recv(a.peer_id, "shape", into={"x": torch.empty(4, 4)})
    with pytest.raises(TransferError, match="refused"):
        await a.dataplane.send(b.peer_id, "shape", {"x": torch.empty(2, 8)}, timeout=5)
    with pytest.raises(SpecMismatch):
        await pending.wait(5)
    # the channel survives a refused message
    await a.dataplane.send(b.peer_id, "ok", {"x": torch.ones(2)})
    assert torch.equal((await b.dataplane.recv(a.peer_id, "ok", timeout=5))["x"], torch.ones(2))


async def test_libp2p_fallback_when_direct_disabled(nodes):
    async with nodes(2, dataplane_direct=False) as (a, b):
        await a.connect(b.addrs()[0])
        data = {"x": torch.randn(300_000)}
        report = await a.dataplane.send(b.peer_id, "fb", data, timeout=20)
        assert report.path == "libp2p"
        received = await b.dataplane.recv(a.peer_id, "fb", timeout=5)
        assert received.path == "libp2p"
        _assert_same(data, received.tensors)


async def test_fallback_when_direct_address_is_dead(pair):
    a, b = pair
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    b.config.dataplane_announce = f"127.0.0.1:{dead_port}"
    report = await a.dataplane.send(b.peer_id, "dead", {"x": torch.ones(3)}, timeout=20)
    assert report.path == "libp2p"
    assert torch.equal((await b.dataplane.recv(a.peer_id, "dead", timeout=5))["x"], torch.ones(3))


async def _through_proxy(b, tamper=None):
    proxy = TcpProxy(("127.0.0.1", b.dataplane.listen_port), tamper)
    port = await b.nursery.start(proxy.serve)
    b.config.dataplane_announce = f"127.0.0.1:{port}"
    return proxy


async def test_eavesdropper_sees_only_ciphertext(pair):
    a, b = pair
    proxy = await _through_proxy(b)
    marker = b"GOSSAMER-SECRET-PAYLOAD-" * 4096
    report = await a.dataplane.send(b.peer_id, "secret", {"m": marker}, timeout=10)
    assert report.path == "direct" and proxy.connections == 1
    assert bytes((await b.dataplane.recv(a.peer_id, "secret", timeout=5))["m"]) == marker
    assert len(proxy.seen) > len(marker)
    assert b"GOSSAMER-SECRET" not in proxy.seen
    assert b"secret" not in proxy.seen  # the tag is sealed too


async def test_corrupted_byte_is_detected_and_reported(pair):
    a, b = pair
    flip_at = 300_000

    def flip(direction, offset, data):
        if direction == "c2s" and offset <= flip_at < offset + len(data):
            i = flip_at - offset
            data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        return data

    await _through_proxy(b, flip)
    pending = b.dataplane.post_recv(a.peer_id, "c")
    with pytest.raises((ChannelClosed, TransferError)):
        await a.dataplane.send(b.peer_id, "c", {"x": torch.randn(1 << 20)}, timeout=10)
    with pytest.raises(IntegrityError):
        await pending.wait(5)
    # a fresh channel (no proxy) works afterwards
    b.config.dataplane_announce = ""
    await a.dataplane.send(b.peer_id, "after", {"x": torch.ones(1)}, timeout=10)
    assert (await b.dataplane.recv(a.peer_id, "after", timeout=5))["x"].item() == 1.0


async def test_truncated_transfer_is_detected(pair):
    a, b = pair
    cut_at = 2_000_000

    def cut(direction, offset, data):
        if direction == "c2s" and offset + len(data) > cut_at:
            return None if offset >= cut_at else data[: cut_at - offset]
        return data

    await _through_proxy(b, cut)
    pending = b.dataplane.post_recv(a.peer_id, "t")
    with pytest.raises((ChannelClosed, TransferError)):
        await a.dataplane.send(b.peer_id, "t", {"x": torch.randn(2 << 20)}, timeout=10)
    with pytest.raises(TruncatedTransfer):
        await pending.wait(5)
    # the cut channel ended quietly; the node serves a fresh one (no proxy)
    b.config.dataplane_announce = ""
    await a.dataplane.send(b.peer_id, "after", {"x": torch.ones(1)}, timeout=10)
    assert (await b.dataplane.recv(a.peer_id, "after", timeout=5))["x"].item() == 1.0


async def test_stranger_without_the_key_is_refused(pair):
    a, b = pair
    port = b.dataplane.listen_port
    attempts = [
        os.urandom(16) + os.urandom(64),  # unknown channel id
        b"",  # connect and say nothing
        os.urandom(16) + b"\x05\x00\x00\x00\x20" + os.urandom(32),  # HELLO-shaped junk
    ]
    for blob in attempts:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            # the node may hang up while we are still talking: that is the point
            with contextlib.suppress(trio.BrokenResourceError):
                if blob:
                    await stream.send_all(blob)
                await stream.send_eof()
            with trio.fail_after(8), contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some(100) == b""
    # the real peers still exchange data
    await a.dataplane.send(b.peer_id, "still", {"x": torch.ones(4)}, timeout=10)
    assert torch.equal((await b.dataplane.recv(a.peer_id, "still", timeout=5))["x"], torch.ones(4))


async def test_receive_deadline_and_cancelled_send(pair):
    a, b = pair
    with pytest.raises(DeadlineExceeded):
        await b.dataplane.recv(a.peer_id, "never", timeout=0.1)
    await a.dataplane.send(b.peer_id, "warm-up", {"x": torch.ones(1)}, timeout=10)
    big = torch.randn(16 << 20)
    pending = b.dataplane.post_recv(a.peer_id, "cancelled")
    with trio.move_on_after(0.01):
        await a.dataplane.send(b.peer_id, "cancelled", {"x": big})
    with pytest.raises(TransferError):
        await pending.wait(10)
    await a.dataplane.send(b.peer_id, "next", {"x": torch.ones(2)}, timeout=10)
    assert torch.equal((await b.dataplane.recv(a.peer_id, "next", timeout=5))["x"], torch.ones(2))


async def test_unsolicited_message_over_budget_is_refused(nodes):
    async with nodes(
        2, dataplane_unsolicited_budget_bytes=1 << 20, dataplane_unsolicited_timeout=0.3
    ) as (a, b):
        await a.connect(b.addrs()[0])
        with pytest.raises(TransferError, match="no receiver"):
            await a.dataplane.send(b.peer_id, "flood", {"x": torch.randn(1 << 19)}, timeout=10)
        assert b.dataplane.status()["unsolicited_bytes"] == 0


async def test_guarded_tags_take_bytes_only_from_allowed_peers(nodes, caplog):
    async with nodes(3) as (a, b, c):
        await a.connect(c.addrs()[0])
        await b.connect(c.addrs()[0])
        allowed = {a.peer_id}
        c.dataplane.guard("ar/run-x/", lambda peer: peer in allowed)
        got = c.dataplane.post_recv(a.peer_id, "ar/run-x/0/rs/0/0")
        await a.dataplane.send(c.peer_id, "ar/run-x/0/rs/0/0", {"x": torch.ones(4)}, timeout=10)
        assert torch.equal((await got.wait(5))["x"], torch.ones(4))
        for _ in range(5):  # refused before a byte is buffered; one log line
            with pytest.raises(TransferError, match="not admitted"):
                await b.dataplane.send(c.peer_id, "ar/run-x/0/rs/1/0", {"x": torch.ones(1 << 16)})
        assert c.dataplane.status()["unsolicited_bytes"] == 0
        lines = [r for r in caplog.records if "not admitted" in r.getMessage()]
        assert len(lines) == 1
        # other tags are not guarded; removing the guard lets b in
        await b.dataplane.send(c.peer_id, "other", {"x": torch.ones(1)}, timeout=10)
        allowed.discard(a.peer_id)  # read live: revoked mid-run
        with pytest.raises(TransferError, match="not admitted"):
            await a.dataplane.send(c.peer_id, "ar/run-x/1/rs/0/0", {"x": torch.ones(4)})
        c.dataplane.guard("ar/run-x/", None)
        got = c.dataplane.post_recv(b.peer_id, "ar/run-x/2/rs/0/0")
        await b.dataplane.send(c.peer_id, "ar/run-x/2/rs/0/0", {"x": torch.ones(2)}, timeout=10)
        assert torch.equal((await got.wait(5))["x"], torch.ones(2))
