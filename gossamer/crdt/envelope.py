"""Signed envelopes: every run-document update travels and is stored inside one.

An envelope is (author public key, Ed25519 signature, pycrdt update).  The
signature covers ``SHA-256(DOMAIN ‖ run id ‖ 0x00 ‖ update)``, so an update
signed for one run cannot be replayed into another.  The pycrdt client id of
the author is derived from the public key (:func:`client_id_for`), so a
receiver checks that every struct in the update carries exactly that id.

Encodings (msgpack arrays, bytes as bin):

* on the sync stream: ``[1, pubkey | nil, signature, update]`` — the 32-byte
  key is sent only the first time an author appears on a stream; after that
  the receiver looks it up by the client id found in the update.  Overhead:
  75–77 bytes per update including the 4-byte frame length, 109–111 bytes
  when the key is included.
* on disk: ``[pubkey, signature, update]``.
"""

from __future__ import annotations

import hashlib
from typing import Any

from gossamer.crdt import _yupdate
from gossamer.node import Identity, ProtocolError, peer_id_from_public_key, verify_signature, wire

DOMAIN = b"gossamer/crdt/1\x00"
CLIENT_DOMAIN = b"gossamer/crdt/client\x00"
MSG_ENVELOPE = 1


def client_id_for(public_key: bytes) -> int:
    """The pycrdt client id of an author: 53 bits of SHA-256 of its public key.

    53 bits is the most pycrdt accepts (lib0 numbers are JavaScript-safe);
    finding a key whose id collides with a given member's costs ~2**53 hashes.
    """
    digest = hashlib.sha256(CLIENT_DOMAIN + public_key).digest()
    return int.from_bytes(digest[:8], "big") & _yupdate.MAX_SAFE


def signing_digest(run_id: str, update: bytes) -> bytes:
    h = hashlib.sha256(DOMAIN)
    h.update(run_id.encode())
    h.update(b"\x00")
    h.update(update)
    return h.digest()


class Envelope:
    """One signed update.  ``decoded`` caches the parsed update (see _yupdate)."""

    __slots__ = ("_decoded", "_peer_id", "author", "signature", "update")

    def __init__(self, author: bytes, signature: bytes, update: bytes) -> None:
        if len(author) != 32:
            raise ProtocolError("an envelope's author key is 32 bytes")
        if len(signature) != 64:
            raise ProtocolError("an envelope's signature is 64 bytes")
        self.author = bytes(author)
        self.signature = bytes(signature)
        self.update = bytes(update)
        self._decoded: _yupdate.Update | None = None
        self._peer_id: str | None = None

    @classmethod
    def sign(cls, identity: Identity, run_id: str, update: bytes) -> Envelope:
        return cls(identity.public_key_bytes, identity.sign(signing_digest(run_id, update)), update)

    def verify(self, run_id: str) -> bool:
        return verify_signature(self.author, self.signature, signing_digest(run_id, self.update))

    @property
    def author_peer_id(self) -> str:
        if self._peer_id is None:
            self._peer_id = peer_id_from_public_key(self.author)
        return self._peer_id

    @property
    def decoded(self) -> _yupdate.Update:
        """The parsed update; raises UpdateFormatError once per bad envelope."""
        if self._decoded is None:
            self._decoded = _yupdate.decode(self.update)
        return self._decoded

    @property
    def client(self) -> int:
        """The (single) client id whose structs this update carries."""
        ranges = self.decoded.ranges
        return next(iter(ranges)) if len(ranges) == 1 else -1

    @property
    def span(self) -> tuple[int, int]:
        """(first clock, end clock) of the author's structs."""
        ranges = self.decoded.ranges
        return next(iter(ranges.values())) if len(ranges) == 1 else (0, 0)

    def __len__(self) -> int:
        return len(self.update)

    def __repr__(self) -> str:
        start, end = self.span if self._decoded is not None else (-1, -1)
        return f"Envelope({self.author_peer_id[-8:]}, clocks {start}..{end}, {len(self.update)} B)"

    # ----------------------------------------------------------- encodings

    def to_wire(self, include_key: bool) -> bytes:
        return wire.pack(
            [MSG_ENVELOPE, self.author if include_key else None, self.signature, self.update]
        )

    def to_disk(self) -> bytes:
        return wire.pack([self.author, self.signature, self.update])

    @classmethod
    def from_disk(cls, payload: bytes) -> Envelope:
        obj = wire.unpack(payload, max_container=8)
        if not (isinstance(obj, list) and len(obj) == 3 and all(isinstance(x, bytes) for x in obj)):
            raise ProtocolError("a stored envelope is [key, signature, update]")
        return cls(obj[0], obj[1], obj[2])


def envelope_from_wire(obj: list[Any], key_of_client: Any) -> Envelope:
    """Build an envelope from a decoded ``[1, key|nil, sig, update]`` message.

    ``key_of_client(client_id) -> bytes | None`` supplies the author key when
    the message omits it.
    """
    if len(obj) != 4:
        raise ProtocolError("an envelope message has 4 fields")
    _, key, signature, update = obj
    if not isinstance(signature, bytes) or not isinstance(update, bytes):
        raise ProtocolError("envelope signature and update must be bytes")
    decoded = None
    if key is None:
        try:
            decoded = _yupdate.decode(update)
        except _yupdate.UpdateFormatError as exc:
            raise ProtocolError(f"malformed update: {exc}") from None
        client = next(iter(decoded.ranges), None)
        key = key_of_client(client) if client is not None else None
        if key is None:
            raise ProtocolError("envelope without a key from an author not seen on this stream")
    elif not isinstance(key, bytes):
        raise ProtocolError("envelope key must be bytes or nil")
    envelope = Envelope(key, signature, update)
    envelope._decoded = decoded
    return envelope
