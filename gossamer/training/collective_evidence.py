"""Signed contributions: what lets a part's verifier tell a lying owner from a two-faced sender.

A member signs every piece it contributes: Ed25519 over ``DOMAIN ‖ key ‖ attempt ‖ part ‖
piece ‖ weight ‖ sha256(encoded bytes)``. The owner checks the signature of each contribution
it receives (a bad one is refused like an undecodable piece) and forwards, in its all-gather
message, the (digest, signature) of every contribution it summed: the part's *evidence*. The
verifier holds its own signed copies, so for each contributor it compares:

* the owner's signature does not verify → the owner made the evidence up: a dispute;
* two valid signatures by the same contributor on different digests for the same piece → the
  contributor sent different bytes to the owner and to the verifier. That is a proof anyone can
  check (:class:`Proof`), carried in the verifier's status; every member drops the contributor,
  on the proof alone, whoever relayed it.

Without this a contributor that sent one thing to the owner and another to the verifier would
make two honest members disagree, attempt after attempt, with different partners. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gossamer.node import Identity, public_key_from_peer_id, verify_signature

DOMAIN = b"gossamer/contribution/1\x00"
DIGEST_BYTES = 32
SIGNATURE_BYTES = 64
ENTRY_BYTES = DIGEST_BYTES + SIGNATURE_BYTES


def digest_of(buffers: Sequence[torch.Tensor]) -> bytes:
    """sha256 of a piece's encoded buffers, in order (what the wire carried)."""
    h = hashlib.sha256()
    for buffer in buffers:
        h.update(buffer.contiguous().view(torch.uint8).numpy().tobytes())
    return h.digest()


def _message(key: str, attempt: int, part: int, piece: int, weight: float, digest: bytes) -> bytes:
    context = f"{key}\x00{attempt}\x00{part}\x00{piece}".encode()
    return DOMAIN + context + b"\x00" + struct.pack("<d", weight) + digest


def sign(
    identity: Identity, key: str, attempt: int, part: int, piece: int, weight: float, digest: bytes
) -> bytes:
    return identity.sign(_message(key, attempt, part, piece, weight, digest))


def verify(
    peer_id: str,
    key: str,
    attempt: int,
    part: int,
    piece: int,
    weight: float,
    digest: bytes,
    signature: bytes,
) -> bool:
    if len(digest) != DIGEST_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        public = public_key_from_peer_id(peer_id)
    except ValueError:
        return False
    return verify_signature(public, signature, _message(key, attempt, part, piece, weight, digest))


def pack_evidence(
    members: Sequence[str], entries: dict[str, tuple[bytes, bytes, float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (n × 96 bytes, n weights) tensors an owner's all-gather message carries: each
    member's (digest ‖ signature) and claimed weight, zeros for members it did not sum."""
    raw = bytearray(len(members) * ENTRY_BYTES)
    weights = torch.zeros(len(members), dtype=torch.float64)
    for i, peer in enumerate(members):
        entry = entries.get(peer)
        if entry is not None:
            digest, signature, weight = entry
            raw[i * ENTRY_BYTES : (i + 1) * ENTRY_BYTES] = digest + signature
            weights[i] = weight
    return torch.frombuffer(raw, dtype=torch.uint8), weights


def unpack_evidence(
    members: Sequence[str], raw: torch.Tensor, weights: torch.Tensor
) -> dict[str, tuple[bytes, bytes, float]]:
    data = raw.contiguous().numpy().tobytes()
    if len(data) != len(members) * ENTRY_BYTES or weights.numel() != len(members):
        raise ValueError("evidence of the wrong size")
    out = {}
    for i, peer in enumerate(members):
        entry = data[i * ENTRY_BYTES : (i + 1) * ENTRY_BYTES]
        if any(entry):
            out[peer] = (entry[:DIGEST_BYTES], entry[DIGEST_BYTES:], float(weights[i]))
    return out


@dataclass(frozen=True)
class Proof:
    """Two valid signatures by ``peer`` on different contents of the same piece."""

    peer: str
    part: int
    piece: int
    first: tuple[float, bytes, bytes]  # weight, digest, signature
    second: tuple[float, bytes, bytes]

    def holds(self, key: str, attempt: int) -> bool:
        if self.first[:2] == self.second[:2]:
            return False
        return all(
            verify(self.peer, key, attempt, self.part, self.piece, w, d, s)
            for w, d, s in (self.first, self.second)
        )

    def pack(self) -> list:
        return [self.peer, self.part, self.piece, *self.first, *self.second]

    @classmethod
    def unpack(cls, raw: object) -> Proof:
        if not (isinstance(raw, list) and len(raw) == 9):
            raise ValueError("a proof is [peer, part, piece, w, d, s, w, d, s]")
        peer, part, piece, w1, d1, s1, w2, d2, s2 = raw
        if not isinstance(peer, str) or not all(type(v) is int for v in (part, piece)):
            raise ValueError("malformed proof header")
        for w, d, s in ((w1, d1, s1), (w2, d2, s2)):
            if not isinstance(w, float) or not isinstance(d, bytes) or not isinstance(s, bytes):
                raise ValueError("malformed proof entry")
        return cls(peer, part, piece, (w1, d1, s1), (w2, d2, s2))
