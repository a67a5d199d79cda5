"""An admitted member cannot grow everyone's run document without bound: a per-author quota on
the distinct keys it writes, checked by every replica alike; a refused update leaves nothing."""

from __future__ import annotations

from gossamer.crdt import Charter, Replica, RunDocument, Verdict
from gossamer.crdt.replica import Limits
from gossamer.node import Identity

HOST, A, B = Identity.generate(), Identity.generate(), Identity.generate()


def _doc(charter: Charter, identity: Identity, quota: int) -> RunDocument:
    replica = Replica(charter, identity, limits=Limits(max_keys_per_author=quota))
    return RunDocument(replica, clock=lambda: 1000.0)


def test_a_member_past_its_key_quota_is_refused_by_every_replica() -> None:
    charter = Charter.create(HOST, "quota", created=0.0)
    greedy = _doc(charter, A, quota=10**6)  # its own replica lets it write
    honest = _doc(charter, B, quota=8)
    receivers = [_doc(charter, HOST, quota=8), _doc(charter, Identity.generate(), quota=8)]
    writes = [greedy.set_fragment(f"f{i}", 1, "training") for i in range(12)]
    writes.append(greedy.set_fragment("f0", 2, "training"))  # an old key again
    for receiver in receivers:
        verdicts = [receiver.replica.receive(e).verdict for e in writes]
        assert verdicts[:8] == [Verdict.APPLIED] * 8
        assert Verdict.REFUSED in verdicts[8:]
        assert Verdict.APPLIED not in verdicts[8:]  # blocked once refused
        assert len(receiver.fragments()) == 8
        keys = receiver.replica._keys
        assert sum(1 for root, _ in keys if root == "fragments") == 8  # nothing left behind
    # the quota is per author: others write as before
    write = honest.enter_round(1, "training")
    for receiver in receivers:
        receipt = receiver.replica.receive(write)
        assert receipt.verdict is Verdict.APPLIED, receipt.reason
