"""Persistence of a run document: append, reload, torn tails, compaction."""

from __future__ import annotations

from gossamer.crdt import Charter, Replica, RunDocument
from gossamer.crdt.store import RunStore
from gossamer.node import Identity

HOST, A = Identity(b"\x01" * 32), Identity(b"\x02" * 32)
CHARTER = Charter.create(HOST, "tiny", created=0.0)


def _persistent(directory, identity: Identity) -> tuple[RunDocument, RunStore]:
    store = RunStore(directory)
    replica = Replica(CHARTER, identity)
    replica.load(store.load())
    replica.persist = store.append
    store.save_charter(CHARTER)
    return RunDocument(replica, clock=lambda: 5.0), store


def test_reload_gives_the_same_document(tmp_path):
    doc, store = _persistent(tmp_path, A)
    remote = RunDocument(Replica(CHARTER, HOST))
    doc.replica.receive(remote.set_config(model={"d": 128}))
    doc.join(["/ip4/127.0.0.1/tcp/9"])
    doc.report_metrics(step=3, loss=0.5, tokens=99)
    store.close()
    again, store2 = _persistent(tmp_path, A)
    assert again.replica.fingerprint() == doc.replica.fingerprint()
    assert again.replica.state_vector() == doc.replica.state_vector()
    assert store2.load_charter(CHARTER.run_id) == CHARTER
    # Writing continues at the right clock: a third replica accepts the new update.
    third = Replica(CHARTER, HOST)
    for envelope in again.replica.missing_for({}):
        third.receive(envelope)
    assert third.receive(again.heartbeat(6.0)).ok
    assert third.fingerprint() == again.replica.fingerprint()


def test_torn_tail_is_cut_off(tmp_path):
    doc, store = _persistent(tmp_path, A)
    doc.join([])
    doc.report_metrics(step=1)
    store.close()
    size = store.log_path.stat().st_size
    with open(store.log_path, "ab") as fh:
        fh.write(b"\x00\x00\x01\x00partial")  # a crash in the middle of an append
    again, store2 = _persistent(tmp_path, A)
    assert again.replica.fingerprint() == doc.replica.fingerprint()
    assert store2.log_path.stat().st_size == size


def test_compaction_after_a_checkpoint(tmp_path):
    doc, store = _persistent(tmp_path, A)
    doc.join([])
    for step in range(300):
        doc.report_metrics(step=step, loss=1.0, tokens=step)
    assert doc.replica.make_checkpoint() is not None
    live = doc.replica.log_bytes + 112 * doc.replica.log_count
    assert store.should_compact(live, min_bytes=0)
    before = store.file_bytes
    after = store.compact(doc.replica.envelopes())
    assert after < before / 10
    store.close()
    again, _ = _persistent(tmp_path, A)
    assert again.replica.fingerprint() == doc.replica.fingerprint()
    assert again.metrics()[A.peer_id].step == 299
