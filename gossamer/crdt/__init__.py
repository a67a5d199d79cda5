"""CRDT layer: the replicated, signed run document.

Training code uses :class:`RunDocument` (typed accessors, no pycrdt) through a
:class:`Run` that :class:`CrdtService` keeps in sync with the run's members::

    crdt = await CrdtService.start(node)
    run = await crdt.host_run("tiny-gpt", config={"model": {...}, "hparams": {...}})
    # elsewhere: run = await crdt.join_run(run_id, bootstrap=[host_multiaddr])
    run.doc.enter_round(3, "training")
    run.doc.report_metrics(step=3, loss=2.1, tokens=65536)
    print(run.doc.round().participants, run.doc.metrics())

Modules: ``rules`` (layout and permissions), ``replica`` (checks + pycrdt +
signed log, no I/O), ``document`` (typed view), ``envelope`` / ``charter``
(signatures), ``store`` (disk), and the libp2p protocol: ``sync`` (the
service), ``run``, ``protocol`` (messages), ``options``, ``handshake``,
``link``, ``mesh`` (flooding, anti-entropy), ``discovery`` (via the DHT).
Imported lazily: ``import gossamer.crdt`` costs nothing until a name is used.
"""

from __future__ import annotations

from gossamer._lazy import lazy_face

_EXPORTS = {
    "open_stack": "gossamer.crdt.stack",
    "check_run_id": "gossamer.crdt.charter",
    "attach_stack": "gossamer.crdt.stack",
    "NAME_RE": "gossamer.crdt.charter",
    "RunDocument": "gossamer.crdt.document",
    "RunConfig": "gossamer.crdt.document",
    "Member": "gossamer.crdt.document",
    "RoundEntry": "gossamer.crdt.document",
    "RoundPlan": "gossamer.crdt.document",
    "RoundView": "gossamer.crdt.document",
    "Fragment": "gossamer.crdt.document",
    "Metrics": "gossamer.crdt.document",
    "Charter": "gossamer.crdt.charter",
    "CharterError": "gossamer.crdt.charter",
    "Envelope": "gossamer.crdt.envelope",
    "Replica": "gossamer.crdt.replica",
    "Receipt": "gossamer.crdt.replica",
    "Verdict": "gossamer.crdt.replica",
    "Limits": "gossamer.crdt.replica",
    "WriteError": "gossamer.crdt.replica",
    "CrdtService": "gossamer.crdt.sync",
    "Run": "gossamer.crdt.run",
    "SyncOptions": "gossamer.crdt.options",
    "RunAccessError": "gossamer.crdt.protocol",
    "Invite": "gossamer.crdt.invite",
    "InviteError": "gossamer.crdt.invite",
}

__all__, __getattr__, __dir__ = lazy_face(__name__, _EXPORTS)
