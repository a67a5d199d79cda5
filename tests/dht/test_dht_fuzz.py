"""Malformed DHT messages never crash a node (hypothesis).

Two real nodes run in a trio loop on a background thread for the whole module;
each hypothesis example sends one malformed request (well-framed RPC with bad
parameters, crafted entries, or raw bytes on the protocol) from the attacker
to the victim, then checks the victim still answers.  Cheap per example, so
hypothesis can try many.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.from_thread
from conftest import wait_until
from dht_helpers import dht_of, fast_config, started
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossamer.node import GossamerError, wire


class Pair:
    """attacker + victim nodes, driven from the test thread."""

    token: trio.lowlevel.TrioToken
    attacker: Any
    victim: Any

    def run(self, fn: Any, *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=self.token)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base: Path = tmp_path_factory.mktemp("fuzz")
    box = Pair()
    ready = threading.Event()
    failure: list[BaseException] = []

    async def host() -> None:
        box.token = trio.lowlevel.current_trio_token()
        async with (
            started(base / "victim", fast_config()) as victim,
            started(base / "attacker", fast_config()) as attacker,
        ):
            await attacker.connect(victim.addrs()[0])
            await wait_until(
                lambda: len(dht_of(victim).table) == 1, 10, what="victim knows attacker"
            )
            box.victim, box.attacker = victim, attacker
            box.stop = trio.Event()  # type: ignore[attr-defined]
            ready.set()
            await box.stop.wait()  # type: ignore[attr-defined]

    def thread_main() -> None:
        try:
            trio.run(host)
        except BaseException as exc:  # surfaced by the fixture below
            failure.append(exc)
            ready.set()

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    assert ready.wait(30), "nodes did not start"
    if failure:
        raise failure[0]
    yield box
    trio.from_thread.run_sync(box.stop.set, trio_token=box.token)  # type: ignore[attr-defined]
    thread.join(30)
    if failure:
        raise failure[0]


def _healthy(box: Pair) -> None:
    async def check() -> None:
        result = await box.attacker.call(
            box.victim.peer_id, "dht", "find_node", {"target": b"\x00" * 32}, timeout=5
        )
        assert isinstance(result, dict) and "peers" in result
        assert not dht_of(box.victim)._closed

    box.run(check)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=80),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=6)
    ),
    max_leaves=20,
)

crafted_entries = st.builds(
    lambda fields: wire.pack(fields),
    st.lists(msgpack_values, min_size=0, max_size=8)
    | st.tuples(
        st.text(max_size=20) | msgpack_values,
        st.binary(max_size=60) | msgpack_values,
        st.floats() | msgpack_values,
        st.floats() | msgpack_values,
        st.sampled_from(["", "12D3KooWnotreallyapeeridatall"]) | msgpack_values,
        st.binary(max_size=70) | msgpack_values,
    ).map(list),
)

keys = st.sampled_from(["/gossamer/test/k", "/gossamer/peer/x", "bad", ""]) | st.text(max_size=60)

requests = st.one_of(
    st.tuples(st.just("hello"), st.fixed_dictionaries({"addrs": msgpack_values})),
    st.tuples(st.just("hello"), st.fixed_dictionaries({"addrs": st.lists(st.text(max_size=80))})),
    st.tuples(st.just("find_node"), st.fixed_dictionaries({"target": msgpack_values})),
    st.tuples(st.just("find_value"), st.fixed_dictionaries({"key": keys | msgpack_values})),
    st.tuples(
        st.just("store"),
        st.fixed_dictionaries(
            {"key": keys, "entries": st.lists(crafted_entries | msgpack_values, max_size=4)}
        ),
    ),
    st.tuples(
        st.sampled_from(["store", "find_value", "nope", "hello"]),
        st.dictionaries(st.text(max_size=10), msgpack_values, max_size=4),
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests)
def test_malformed_rpc_requests_get_typed_errors_and_the_node_lives_on(
    pair: Pair, request: tuple[str, dict[str, Any]]
) -> None:
    method, params = request

    async def send() -> None:
        with contextlib.suppress(GossamerError):  # a typed refusal is the right answer
            await pair.attacker.call(pair.victim.peer_id, "dht", method, params, timeout=5)

    pair.run(send)
    _healthy(pair)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=st.binary(max_size=300) | st.builds(lambda b: wire.frame(b), st.binary(max_size=200)))
def test_raw_bytes_on_the_dht_protocol_never_crash_the_node(pair: Pair, raw: bytes) -> None:
    async def send() -> None:
        stream = await pair.attacker.open_stream(pair.victim.peer_id, "/gossamer/dht/1.0.0")
        try:
            await stream.write(raw)
            await stream.close()  # our side is done: the victim sees the end of the stream
            with trio.move_on_after(2):
                while await stream.read(4096):
                    pass
        except ConnectionError:
            pass
        finally:
            await stream.reset()

    pair.run(send)
    _healthy(pair)


def test_the_victim_still_stores_and_serves_after_the_fuzzing(pair: Pair) -> None:
    async def roundtrip() -> None:
        await dht_of(pair.attacker).put("/gossamer/test/after", "fine", time.time() + 30)
        record = await dht_of(pair.victim).get("/gossamer/test/after")
        assert record is not None and record.value == "fine"

    pair.run(roundtrip)
