"""Sealed frames of the data plane: AES-256-GCM with per-direction keys and counters.

Sans-I/O: this module turns plaintext into frames and frames back into
plaintext; the channel moves the bytes.

Keys come from a handshake carried over a libp2p stream, which Noise has
already encrypted and bound to both peer ids: each side contributes 32 random
bytes, and HKDF over both (salted with the channel id, labelled with both peer
ids) gives one key per direction.  Only the two peers ever see the inputs, so
a man in the middle of the direct TCP path can neither read a frame nor forge
one, and a frame cannot be replayed, reordered or reflected: the nonce is the
frame's position in its direction, and each direction has its own key.

Frame: ``type (1 byte) | length (4 bytes, big-endian) | ciphertext+tag``.  The
five header bytes are authenticated as associated data.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gossamer.node.errors import IntegrityError

HEADER = struct.Struct(">BI")
TAG_BYTES = 16
NONCE_PREFIX = b"\x00\x00\x00\x00"
KDF_LABEL = b"gossamer/dataplane/v1"

# frame types
BEGIN = 1  # msgpack: a message's id, tag and tensor specs
DATA = 2  # raw bytes of one tensor's next chunk
END = 3  # msgpack: frame and byte counts of the message just sent
ACK = 4  # msgpack: the receiver's verdict on a message
HELLO = 5  # msgpack: proves knowledge of the channel key on a fresh TCP connection
CLOSE = 6  # empty: orderly shutdown
ABORT = 7  # msgpack: the sender gave up on the message in progress
FRAME_TYPES = frozenset({BEGIN, DATA, END, ACK, HELLO, CLOSE, ABORT})


def derive_keys(
    initiator_nonce: bytes,
    responder_nonce: bytes,
    channel_id: bytes,
    initiator_peer: str,
    responder_peer: str,
) -> tuple[bytes, bytes]:
    """(initiator→responder key, responder→initiator key)."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=channel_id,
        info=KDF_LABEL + b"|" + initiator_peer.encode() + b"|" + responder_peer.encode(),
    ).derive(initiator_nonce + responder_nonce)
    return okm[:32], okm[32:]


class _Direction:
    """One direction of a channel: an AEAD key and the count of frames it has seen."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        nonce = NONCE_PREFIX + self._counter.to_bytes(8, "big")
        self._counter += 1
        return nonce


class Sealer(_Direction):
    """Seals outgoing frames of one direction."""

    def seal(self, frame_type: int, plaintext: bytes | memoryview) -> bytes:
        header = HEADER.pack(frame_type, len(plaintext) + TAG_BYTES)
        return header + self._aead.encrypt(self._nonce(), plaintext, header)

    def seal_into(self, frame_type: int, plaintext: memoryview, out: memoryview) -> int:
        """Seal ``plaintext`` into ``out`` (header included, no extra copy); return the size."""
        size = len(plaintext) + TAG_BYTES
        HEADER.pack_into(out, 0, frame_type, size)
        self._aead.encrypt_into(
            self._nonce(),
            plaintext,
            bytes(out[: HEADER.size]),
            out[HEADER.size : HEADER.size + size],
        )
        return HEADER.size + size


class Opener(_Direction):
    """Opens incoming frames of one direction; any failure is an IntegrityError."""

    def open(self, header: bytes, sealed: bytes | memoryview) -> bytes:
        try:
            return self._aead.decrypt(self._nonce(), sealed, header)
        except InvalidTag:
            raise IntegrityError("a data-plane frame failed authentication") from None

    def open_into(self, header: bytes, sealed: memoryview, out: memoryview) -> None:
        try:
            self._aead.decrypt_into(self._nonce(), sealed, header, out)
        except InvalidTag:
            raise IntegrityError("a data-plane frame failed authentication") from None


def parse_header(header: bytes, max_frame: int) -> tuple[int, int]:
    """(type, sealed length) of a frame header, checked before anything is buffered."""
    frame_type, size = HEADER.unpack(header)
    if frame_type not in FRAME_TYPES:
        raise IntegrityError(f"unknown data-plane frame type {frame_type}")
    if size < TAG_BYTES or size > max_frame + TAG_BYTES:
        raise IntegrityError(f"data-plane frame of {size} bytes is outside the allowed range")
    return frame_type, size
