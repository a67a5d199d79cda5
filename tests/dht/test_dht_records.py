"""Records without a network: keys, signatures, ownership, expiry, size, merging, store quotas."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gossamer.dht import (
    MAX_RECORD_BYTES,
    Entry,
    InvalidKey,
    InvalidRecord,
    QuotaExceeded,
    RecordTooLarge,
    StoreLimits,
    Validators,
    owner_of,
)
from gossamer.dht._records import decode_entry, make_entry, merge, newer, to_record
from gossamer.dht._store import RecordStore
from gossamer.node import Identity

NOW = 1_800_000_000.0
ALICE = Identity(bytes(range(32)))
BOB = Identity(bytes(range(1, 33)))


def entry(key: str = "/gossamer/test/k", value: object = "v", **kw: object) -> Entry:
    kw.setdefault("ts", NOW)
    kw.setdefault("expires_at", NOW + 60)
    return make_entry(key, value, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key",
    [
        "gossamer/x/y",
        "/other/x/y",
        "/gossamer/x",
        "/gossamer//y",
        "/gossamer/X/y",
        "/gossamer/x/" + "a" * 600,
        "/gossamer/x/a\nb",
        42,
    ],
)
def test_malformed_keys_are_refused(key: object) -> None:
    with pytest.raises(InvalidKey):
        Validators().validate(key, entry(), NOW)  # type: ignore[arg-type]


def test_owner_is_a_peer_id_in_the_key_or_the_subkey() -> None:
    a, b = ALICE.peer_id, BOB.peer_id
    assert owner_of(f"/gossamer/peer/{a}", "") == a
    assert owner_of(f"/gossamer/peer/{a}", b) == a  # the key's owner rules
    assert owner_of("/gossamer/run/r1/members", b) == b
    assert owner_of("/gossamer/run/r1/members", "notapeer") is None
    assert owner_of("/gossamer/providers/sha256-abc", "") is None


# ------------------------------------------------------------- signatures


def test_owner_signed_entries_validate() -> None:
    key = f"/gossamer/peer/{ALICE.peer_id}"
    Validators().validate(key, entry(key, {"addrs": []}, identity=ALICE), NOW)
    members = "/gossamer/run/r1/members"
    Validators().validate(members, entry(members, 1, subkey=BOB.peer_id, identity=BOB), NOW)


@pytest.mark.parametrize("how", ["unsigned", "other key", "tampered value", "tampered expiry"])
def test_forged_owner_entries_are_refused(how: str) -> None:
    key = f"/gossamer/peer/{ALICE.peer_id}"
    good = entry(key, "genuine", identity=ALICE)
    forged = {
        "unsigned": entry(key, "evil"),
        "other key": entry(key, "evil", identity=BOB),
        "tampered value": Entry(
            "", entry(key, "evil").value, good.ts, good.expires_at, good.signer, good.sig
        ),
        "tampered expiry": Entry(
            "", good.value, good.ts, good.expires_at + 999, good.signer, good.sig
        ),
    }[how]
    with pytest.raises(InvalidRecord) as caught:
        Validators().validate(key, forged, NOW)
    assert caught.value.code in ("not_owner", "bad_signature")


def test_a_signature_must_verify_even_where_none_is_needed() -> None:
    good = entry(identity=BOB)
    broken = Entry(good.subkey, good.value, good.ts, good.expires_at, good.signer, b"x" * 64)
    with pytest.raises(InvalidRecord, match="does not verify"):
        Validators().validate("/gossamer/test/k", broken, NOW)


# ------------------------------------------------------------ time and size


def test_expired_far_future_and_future_timestamped_entries_are_refused() -> None:
    v = Validators()
    with pytest.raises(InvalidRecord, match="expired"):
        v.validate("/gossamer/test/k", entry(expires_at=NOW - 1, ts=NOW - 2), NOW)
    with pytest.raises(InvalidRecord) as caught:
        v.validate("/gossamer/test/k", entry(expires_at=NOW + 30 * 86400), NOW)
    assert caught.value.code == "ttl"
    with pytest.raises(InvalidRecord) as caught:
        v.validate("/gossamer/test/k", entry(ts=NOW + 3600, expires_at=NOW + 7200), NOW)
    assert caught.value.code == "clock"


def test_oversize_values_are_refused_with_the_limit_in_the_message() -> None:
    with pytest.raises(RecordTooLarge, match=f"limit is {MAX_RECORD_BYTES} bytes"):
        entry(value=b"x" * MAX_RECORD_BYTES)
    blob = Entry("", b"\xc0", NOW, NOW + 1, "", b"").encode() + b"x" * MAX_RECORD_BYTES
    with pytest.raises(RecordTooLarge):
        decode_entry(blob)
    entry(value=b"x" * (MAX_RECORD_BYTES - 200))  # fits


def test_values_must_be_msgpack() -> None:
    with pytest.raises(InvalidRecord) as caught:
        Validators().validate("/gossamer/test/k", Entry("", b"\xc1", NOW, NOW + 60), NOW)
    assert caught.value.code == "bad_value"
    with pytest.raises(InvalidRecord):
        entry(value=object())


def test_namespace_validators_plug_in_per_kind() -> None:
    v = Validators()

    def only_ints(key: str, e: Entry) -> None:
        if not isinstance(e.decoded_value(), int):
            raise InvalidRecord("runs hold integers here")

    v.register("run", only_ints)
    v.validate("/gossamer/run/r1", entry("/gossamer/run/r1", 3), NOW)
    v.validate("/gossamer/other/r1", entry("/gossamer/other/r1", "str ok"), NOW)
    with pytest.raises(InvalidRecord, match="integers"):
        v.validate("/gossamer/run/r1", entry("/gossamer/run/r1", "nope"), NOW)


# ------------------------------------------------------------------ merging


entries_strategy = st.lists(
    st.builds(
        lambda sub, val, ts, exp: Entry(sub, val, NOW + ts, NOW + 10 + exp),
        st.sampled_from(["", "a", "b"]),
        st.sampled_from([b"\x01", b"\x02", b"\x03"]),
        st.integers(0, 3),
        st.integers(0, 3),
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(entries_strategy, st.randoms())
def test_merge_is_order_independent_and_keeps_the_newest(entries: list[Entry], rng) -> None:
    shuffled = list(entries)
    rng.shuffle(shuffled)
    assert merge(entries, NOW) == merge(shuffled, NOW)
    # merging in two halves (two replicas, then each other) gives the same answer
    half = len(entries) // 2
    staged = merge(list(merge(entries[:half], NOW).values()) + entries[half:], NOW)
    assert staged == merge(entries, NOW)
    for subkey, winner in merge(entries, NOW).items():
        rivals = [e for e in entries if e.subkey == subkey]
        assert max(e.ts for e in rivals) == winner.ts


def test_ties_break_on_expiry_then_value() -> None:
    a = Entry("", b"\x01", NOW, NOW + 10)
    b = Entry("", b"\x02", NOW, NOW + 10)
    c = Entry("", b"\x00", NOW, NOW + 20)
    for x, y in itertools.permutations([a, b, c], 2):
        assert newer(x, y) == newer(y, x)
    assert merge([a, b, c], NOW)[""] == c
    assert merge([a, b], NOW)[""] == b


def test_merge_and_record_drop_expired_entries() -> None:
    live, dead = entry(expires_at=NOW + 5), entry(subkey="old", expires_at=NOW - 1, ts=NOW - 2)
    merged = merge([live, dead], NOW)
    assert set(merged) == {""}
    record = to_record("/gossamer/test/k", merged)
    assert record is not None and record.value == "v" and record.subkeys == {}
    assert to_record("/gossamer/test/k", {}) is None


# ------------------------------------------------------------------ store


def test_store_keeps_newest_and_purges_expired() -> None:
    store = RecordStore("self")
    old, new = entry(value="old"), entry(value="new", ts=NOW + 1)
    assert store.put("/gossamer/test/k", new, "p1", NOW)
    assert not store.put("/gossamer/test/k", old, "p2", NOW)
    assert store.get("/gossamer/test/k", NOW)[""].decoded_value() == "new"
    store.put("/gossamer/test/short", entry(expires_at=NOW + 1), "p1", NOW)
    assert store.purge(NOW + 2) == 1
    assert store.get("/gossamer/test/k", NOW + 61) == {}  # expired on read
    assert len(store) == 0 and store.total_bytes == 0


def test_store_bounds_records_per_peer_per_key_and_in_total() -> None:
    limits = StoreLimits(max_entries_per_peer=3, max_subkeys_per_key=4, max_entries=6)
    store = RecordStore("self", limits)
    for i in range(3):
        store.put(f"/gossamer/test/{i}", entry(), "greedy", NOW)
    with pytest.raises(QuotaExceeded, match="greedy"[-8:]):
        store.put("/gossamer/test/3", entry(), "greedy", NOW)
    # replacing one's own entry does not count twice
    store.put("/gossamer/test/0", entry(value="v2", ts=NOW + 1), "greedy", NOW)
    assert store.entries_from("greedy") == 3
    for i in range(3):
        store.put("/gossamer/test/many", entry(subkey=f"s{i}"), f"p{i}", NOW)
    with pytest.raises(QuotaExceeded):  # total
        store.put("/gossamer/test/x", entry(), "p9", NOW)
    store2 = RecordStore("self", StoreLimits(max_subkeys_per_key=2))
    store2.put("/gossamer/test/k", entry(subkey="a"), "p1", NOW)
    store2.put("/gossamer/test/k", entry(subkey="b"), "p2", NOW)
    with pytest.raises(QuotaExceeded, match="sub-keys"):
        store2.put("/gossamer/test/k", entry(subkey="c"), "p3", NOW)
    store3 = RecordStore("self", StoreLimits(max_bytes_per_key=3000))
    store3.put("/gossamer/test/k", entry(value=b"x" * 2000, subkey="a"), "p1", NOW)
    with pytest.raises(RecordTooLarge):
        store3.put("/gossamer/test/k", entry(value=b"x" * 2000, subkey="b"), "p2", NOW)


def test_our_own_records_are_not_counted_against_a_peer_quota() -> None:
    store = RecordStore("self", StoreLimits(max_entries_per_peer=1))
    for i in range(5):
        store.put(f"/gossamer/test/{i}", entry(), "self", NOW)
    assert len(store) == 5
