"""The strict yrs update decoder, against updates pycrdt really writes, and against garbage."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text

from gossamer.crdt import Charter, Envelope, Replica, Verdict, _yupdate
from gossamer.crdt.envelope import client_id_for
from gossamer.node import Identity

A = Identity(b"\x01" * 32)
CHARTER = Charter.create(A, "tiny", created=0.0)


def _updates(doc: Doc, edits) -> list[bytes]:
    out: list[bytes] = []
    sub = doc.observe(lambda event: out.append(event.update))
    for edit in edits:
        with doc.transaction():
            edit()
    doc.unobserve(sub)
    return out


def test_decodes_what_pycrdt_writes():
    doc = Doc(client_id=(1 << 53) - 1)
    members = doc.get("members", type=Map)
    config = doc.get("config", type=Map)

    def two_keys():
        members["b"] = b"x"
        config["c"] = b"y" * 300

    def overwrite_twice():
        members["a"] = b"w"
        members["a"] = b"v"

    first, second, third, fourth = _updates(
        doc,
        [
            lambda: members.__setitem__("a", b"\x01\x02"),
            lambda: members.__setitem__("a", b"\x03"),
            two_keys,
            overwrite_twice,
        ],
    )
    cid = (1 << 53) - 1
    u = _yupdate.decode(first)
    assert u.ranges == {cid: (0, 1)} and u.deletes == {}
    (item,) = u.items
    assert (item.root, item.key, item.value, item.origin) == ("members", "a", b"\x01\x02", None)
    u = _yupdate.decode(second)
    assert u.items[0].origin == (cid, 0) and u.items[0].key is None
    assert u.deletes == {cid: [(0, 1)]}
    u = _yupdate.decode(third)
    assert [(i.root, i.key, len(i.value)) for i in u.items] == [
        ("members", "b", 1),
        ("config", "c", 300),
    ]
    u = _yupdate.decode(fourth)
    assert [i.deleted for i in u.items] == [True, False]
    # The whole document, with merged deleted items, decodes too.
    full = _yupdate.decode(doc.get_update())
    assert full.ranges == {cid: (0, 6)}
    assert sum(i.length for i in full.items) == 6
    assert _yupdate.decode_state_vector(doc.get_state()) == {cid: 6}
    assert _yupdate.encode_state_vector({cid: 6}) == doc.get_state()


def test_refuses_what_the_run_document_never_writes():
    for make in (
        lambda d: d.get("members", type=Map).__setitem__("k", 5),  # a float, not bytes
        lambda d: d.get("members", type=Map).__setitem__("k", Map({"x": b"1"})),  # nested type
        lambda d: d.get("t", type=Text).insert(0, "hello"),
        lambda d: d.get("a", type=Array).append(b"x"),
    ):
        doc = Doc(client_id=7)
        (update,) = _updates(doc, [lambda make=make, doc=doc: make(doc)])
        try:
            _yupdate.decode(update)
        except _yupdate.UpdateFormatError:
            continue
        raise AssertionError(f"accepted {update.hex()}")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_only_format_errors(data):
    with contextlib.suppress(_yupdate.UpdateFormatError):
        _yupdate.decode(data)


def _real_update() -> bytes:
    doc = Doc(client_id=client_id_for(A.public_key_bytes))
    maps = doc.get("members", type=Map)
    (update,) = _updates(doc, [lambda: maps.__setitem__(A.peer_id, b"\x80")])
    return update


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_updates_never_crash_the_replica(data):
    """Flip, cut or insert bytes of a real, properly signed update: refused or applied."""
    update = bytearray(_real_update())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(update)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and pos < len(update):
            update[pos] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del update[pos:]
        else:
            update[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    replica = Replica(CHARTER, Identity(b"\x02" * 32))
    receipt = replica.receive(Envelope.sign(A, CHARTER.run_id, bytes(update)))
    assert receipt.verdict in (Verdict.APPLIED, Verdict.REFUSED, Verdict.PENDING)
    replica.fingerprint()  # the document still reads
