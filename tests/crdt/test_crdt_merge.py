"""The document layer without a network: convergence, permissions, signatures.

Replicas exchange envelopes by hand here, in whatever order a test (or
hypothesis) chooses — the property the sync protocol relies on.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from gossamer.crdt import (
    Charter,
    CharterError,
    Envelope,
    Replica,
    RunDocument,
    Verdict,
    WriteError,
    rules,
)
from gossamer.crdt.envelope import client_id_for
from gossamer.crdt.replica import Severity
from gossamer.node import Identity, wire

SEEDS = [bytes([i]) * 32 for i in range(1, 8)]
IDS = [Identity(s) for s in SEEDS]
HOST, HOST2, A, B, C, D, OUTSIDER = IDS


def make(charter: Charter, identity: Identity) -> RunDocument:
    return RunDocument(Replica(charter, identity), clock=lambda: 1000.0)


def raw_update(client_id: int, root: str, key: str, value: object) -> bytes:
    """An update written with pycrdt directly, bypassing RunDocument's checks."""
    doc = Doc(client_id=client_id)
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    with doc.transaction():
        doc.get(root, type=Map)[key] = wire.pack(value)
    return updates[0]


@pytest.fixture
def charter() -> Charter:
    return Charter.create(HOST, "tiny", hosts=[HOST2.peer_id], created=0.0)


# ----------------------------------------------------------------- convergence


def _apply_op(doc: RunDocument, op: tuple, rng: random.Random) -> Envelope | None:
    kind = op[0]
    try:
        if kind == "config":
            return doc.set_config(**{op[1]: op[2]})
        if kind == "join":
            return doc.join([f"/ip4/127.0.0.1/tcp/{op[1]}"], tokens_per_s=float(op[1]))
        if kind == "metrics":
            return doc.report_metrics(step=op[1], loss=op[2], tokens=op[1] * 1000)
        if kind == "round":
            mine = doc.my_round()
            step = op[1] if mine is None else mine.step + op[1] % 3
            statuses = rules.ROUND_STATUSES
            rank = 0 if mine is None or step > mine.step else rules.status_rank(mine.status)
            return doc.enter_round(step, statuses[rng.randrange(rank, len(statuses))])
        if kind == "expert":
            return doc.serve_expert(op[1], serving=op[2])
        if kind == "fragment":
            current = [f.step for f in doc.fragments() if f.peer_id == doc.peer_id]
            return doc.set_fragment(op[1], max(current, default=0) + 1, "sending")
        if kind == "plan":
            plan = doc.round_plan()
            step = max(op[1], plan.step if plan and plan.host == doc.peer_id else 0)
            return doc.plan_round(step, [doc.peer_id])
        if kind == "heartbeat":
            return doc.heartbeat(float(op[1]))
    except WriteError:
        return None  # e.g. a non-host setting config: refused before anything changed
    raise AssertionError(kind)


OPS = st.one_of(
    st.tuples(st.just("config"), st.sampled_from(["model", "hparams", "data"]), st.integers(0, 9)),
    st.tuples(st.just("join"), st.integers(1, 60000)),
    st.tuples(st.just("metrics"), st.integers(0, 50), st.floats(0, 10, allow_nan=False)),
    st.tuples(st.just("round"), st.integers(0, 5)),
    st.tuples(st.just("expert"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("fragment"), st.sampled_from(["f0", "f1"])),
    st.tuples(st.just("plan"), st.integers(0, 5)),
    st.tuples(st.just("heartbeat"), st.integers(0, 10**6)),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
@given(
    ops=st.lists(st.tuples(st.integers(0, 4), OPS), min_size=1, max_size=40),
    deliveries=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 10**6)), max_size=80),
    seed=st.integers(0, 2**32),
)
def test_random_edits_and_delivery_orders_converge(ops, deliveries, seed):
    """5 replicas (2 hosts, 3 members) edit concurrently; any delivery order gives one state."""
    charter = Charter.create(HOST, "tiny", hosts=[HOST2.peer_id], created=0.0)
    docs = [make(charter, identity) for identity in (HOST, HOST2, A, B, C)]
    rng = random.Random(seed)
    sent: list[Envelope] = []
    delivery = iter(deliveries)
    for author, op in ops:
        envelope = _apply_op(docs[author], op, rng)
        if envelope is not None:
            sent.append(envelope)
        # Interleave some deliveries (any envelope, possibly out of order or twice).
        for _ in range(rng.randrange(3)):
            target, pick = next(delivery, (rng.randrange(5), rng.randrange(10**6)))
            if sent:
                receipt = docs[target].replica.receive(sent[pick % len(sent)])
                assert receipt.verdict is not Verdict.REFUSED, receipt.reason
    # Finally every replica gets everything, in its own random order, some twice.
    for doc in docs:
        batch = sent + rng.sample(sent, len(sent) // 3)
        rng.shuffle(batch)
        for envelope in batch:
            assert doc.replica.receive(envelope).verdict is not Verdict.REFUSED
    first = docs[0]
    for doc in docs[1:]:
        assert doc.replica.state_vector() == first.replica.state_vector()
        assert doc.replica.fingerprint() == first.replica.fingerprint()
        assert doc.config() == first.config()
        assert doc.round() == first.round()
        assert doc.experts() == first.experts()
        assert doc.metrics() == first.metrics()
        assert doc.replica.pending_count() == 0


def test_concurrent_conflicting_edits_resolve_by_our_rules(charter):
    host, host2, a, b = (make(charter, i) for i in (HOST, HOST2, A, B))
    # Both hosts set lr concurrently (same Lamport seq): the higher host id wins everywhere.
    e1 = host.set_config(hparams={"lr": 0.1})
    e2 = host2.set_config(hparams={"lr": 0.2})
    # Two members declare different steps concurrently: the round is the max.
    e3 = a.enter_round(7, "training")
    e4 = b.enter_round(5, "done")
    e5 = a.serve_expert(2)
    e6 = b.serve_expert(2)
    for doc in (host, host2, a, b):
        for envelope in (e6, e4, e2, e5, e3, e1):
            doc.replica.receive(envelope)
    winner = max([(0, HOST.peer_id, 0.1), (0, HOST2.peer_id, 0.2)])[2]
    for doc in (host, host2, a, b):
        assert doc.config().hparams == {"lr": winner}
        assert doc.round().step == 7
        assert list(doc.round().participants) == [A.peer_id]
        assert doc.experts() == {2: sorted([A.peer_id, B.peer_id])}
    # A later write (higher seq) wins regardless of host id.
    e7 = min((host, host2), key=lambda d: d.peer_id).set_config(hparams={"lr": 0.3})
    for doc in (host, host2, a, b):
        doc.replica.receive(e7)
        assert doc.config().hparams == {"lr": 0.3}


def test_integers_stay_integers(charter):
    a, b = make(charter, A), make(charter, B)
    b.replica.receive(a.report_metrics(step=3, loss=1.5, tokens=2**40 + 1, bytes_sent=7))
    m = b.metrics()[A.peer_id]
    assert m.tokens == 2**40 + 1 and isinstance(m.tokens, int)
    assert isinstance(m.step, int) and isinstance(m.bytes_sent, int)


def test_rounds_only_move_forward(charter):
    a = make(charter, A)
    a.enter_round(4, "training")
    with pytest.raises(WriteError, match="goes back"):
        a.enter_round(3, "training")
    with pytest.raises(WriteError, match="goes back"):
        a.enter_round(4, "joined")
    a.enter_round(4, "failed")
    a.enter_round(5, "joined")
    # A hand-made update that moves backwards is refused by receivers too.
    b = make(charter, B)
    for envelope in a.replica.missing_for({}):
        b.replica.receive(envelope)
    cid = client_id_for(A.public_key_bytes)
    doc = Doc(client_id=cid)
    doc.apply_update(a.replica.doc.get_update())
    updates: list[bytes] = []
    doc.observe(lambda event: updates.append(event.update))
    with doc.transaction():
        doc.get("rounds", type=Map)[A.peer_id] = wire.pack({"step": 1, "status": "done"})
    receipt = b.replica.receive(Envelope.sign(A, charter.run_id, updates[0]))
    assert receipt.verdict is Verdict.REFUSED and "goes back" in receipt.reason
    assert b.round().step == 5


def test_config_only_by_hosts(charter):
    a = make(charter, A)
    with pytest.raises(WriteError, match="not a host"):
        a.set_config(model="mine")
    host = make(charter, HOST)
    update = raw_update(client_id_for(A.public_key_bytes), "config", f"{A.peer_id}/model", {"v": 1})
    receipt = host.replica.receive(Envelope.sign(A, charter.run_id, update))
    assert receipt.verdict is Verdict.REFUSED and receipt.severity is Severity.FORBIDDEN
    assert host.config().model is None


# ------------------------------------------------------------------ refusals


def test_member_writing_another_members_record_is_refused(charter):
    host, b = make(charter, HOST), make(charter, B)
    host.replica.receive(b.join(["/ip4/127.0.0.1/tcp/1"]))
    forged = raw_update(
        client_id_for(A.public_key_bytes), "members", B.peer_id, {"addrs": ["/ip4/6.6.6.6/tcp/6"]}
    )
    receipt = host.replica.receive(Envelope.sign(A, charter.run_id, forged))
    assert receipt.verdict is Verdict.REFUSED and receipt.severity is Severity.FORBIDDEN
    assert "may not write" in receipt.reason
    assert host.member(B.peer_id).addrs == ("/ip4/127.0.0.1/tcp/1",)
    # Metrics too.
    forged = raw_update(client_id_for(C.public_key_bytes), "metrics", B.peer_id, {"loss": 0.0})
    assert host.replica.receive(Envelope.sign(C, charter.run_id, forged)).verdict is Verdict.REFUSED
    assert host.metrics() == {}


def test_forged_signature_is_refused(charter):
    host, a = make(charter, HOST), make(charter, A)
    good = a.report_metrics(step=1, loss=2.0)
    bad_sig = Envelope(good.author, bytes(64), good.update)
    receipt = host.replica.receive(bad_sig)
    assert receipt.verdict is Verdict.REFUSED and receipt.severity is Severity.MALFORMED
    # Same bytes, another run: the signature covers the run id.
    other = Charter.create(HOST, "other", created=0.0)
    assert Replica(other, HOST).receive(good).verdict is Verdict.REFUSED
    # A valid signature by someone else over A's update.
    resigned = Envelope(B.public_key_bytes, B.sign(b"x" * 32), good.update)
    assert host.replica.receive(resigned).verdict is Verdict.REFUSED
    assert host.metrics() == {}
    assert host.replica.receive(good).verdict is Verdict.APPLIED


def test_client_id_spoofing_is_refused(charter):
    host, a = make(charter, HOST), make(charter, A)
    host.replica.receive(a.join([]))
    # B signs an update whose structs carry A's client id (writing A's own key).
    spoof = raw_update(
        client_id_for(A.public_key_bytes), "members", A.peer_id, {"addrs": ["/ip4/6.6.6.6/tcp/6"]}
    )
    receipt = host.replica.receive(Envelope.sign(B, charter.run_id, spoof))
    assert receipt.verdict is Verdict.REFUSED and receipt.severity is Severity.MALFORMED
    assert "spoofing" in receipt.reason
    assert host.member(A.peer_id).addrs == ()


def test_outsider_of_restricted_run_is_refused():
    charter = Charter.create(HOST, "closed", access="restricted", allow=[A.peer_id], created=0.0)
    host, a, outsider = make(charter, HOST), make(charter, A), make(charter, OUTSIDER)
    assert host.replica.receive(a.join([])).verdict is Verdict.APPLIED
    with pytest.raises(WriteError, match="not admitted"):
        outsider.join([])
    update = raw_update(client_id_for(OUTSIDER.public_key_bytes), "members", OUTSIDER.peer_id, {})
    receipt = host.replica.receive(Envelope.sign(OUTSIDER, charter.run_id, update))
    assert receipt.verdict is Verdict.REFUSED and receipt.severity is Severity.FORBIDDEN
    assert OUTSIDER.peer_id not in host.members()
    # The creator admits the outsider with a new charter version.
    amended = charter.amend(HOST, allow=[A.peer_id, OUTSIDER.peer_id])
    assert host.replica.set_charter(amended)
    assert not host.replica.set_charter(charter)  # never back to an older version


def test_author_that_broke_a_rule_is_not_applied_later(charter):
    host = make(charter, HOST)
    forged = raw_update(client_id_for(A.public_key_bytes), "members", B.peer_id, {})
    assert host.replica.receive(Envelope.sign(A, charter.run_id, forged)).verdict is Verdict.REFUSED
    a = make(charter, A)
    for envelope in [a.join([]), a.heartbeat(5.0)]:
        assert host.replica.receive(envelope).verdict is Verdict.REFUSED


def test_gaps_wait_for_the_missing_update(charter):
    host, a = make(charter, HOST), make(charter, A)
    first, second, third = a.join([]), a.heartbeat(1.0), a.report_metrics(step=1)
    assert host.replica.receive(third).verdict is Verdict.PENDING
    assert host.replica.receive(second).verdict is Verdict.PENDING
    assert host.replica.pending_count() == 2
    assert host.replica.receive(first).verdict is Verdict.APPLIED
    assert host.replica.pending_count() == 0
    assert host.replica.fingerprint() == a.replica.fingerprint()


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_replaces_history_and_syncs_a_newcomer(charter):
    a = make(charter, A)
    a.join([])
    for step in range(60):
        a.report_metrics(step=step, loss=1.0, tokens=step)
        a.heartbeat(float(step))
    before = a.replica.log_bytes
    checkpoint = a.replica.make_checkpoint()
    assert checkpoint is not None and a.replica.log_count == 1
    assert a.replica.log_bytes < before / 5
    # A newcomer gets one envelope; a peer with full history compacts its log too.
    newcomer, old = make(charter, B), make(charter, HOST)
    for envelope in a.replica.missing_for({}):
        assert newcomer.replica.receive(envelope).verdict is Verdict.APPLIED
    assert newcomer.replica.fingerprint() == a.replica.fingerprint()
    assert newcomer.metrics()[A.peer_id].step == 59
    a2 = make(charter, A)  # replay a's history into `old` the long way
    for envelope in [a2.join([])]:
        old.replica.receive(envelope)
    assert old.replica.receive(checkpoint).verdict is Verdict.APPLIED
    assert old.replica.fingerprint() == a.replica.fingerprint()


def test_charter_is_bound_to_its_run_id():
    charter = Charter.create(HOST, "tiny", created=0.0)
    assert Charter.decode(charter.encode(), charter.run_id) == charter
    impostor = Charter.create(OUTSIDER, "tiny", created=0.0)
    assert impostor.run_id != charter.run_id
    with pytest.raises(CharterError):
        Charter.decode(impostor.encode(), charter.run_id)
    blob = bytearray(charter.encode())
    blob[-1] ^= 1
    with pytest.raises(CharterError):
        Charter.decode(bytes(blob), charter.run_id)
    with pytest.raises(CharterError):
        charter.amend(A, access="restricted")


def test_envelope_overhead(charter):
    a = make(charter, A)
    envelope = a.report_metrics(step=1, loss=1.0)
    assert len(wire.frame(envelope.to_wire(False))) - len(envelope.update) <= 80
    assert len(wire.frame(envelope.to_wire(True))) - len(envelope.update) <= 120
