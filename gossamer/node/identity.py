"""Node identity: an Ed25519 key created on first start and kept on disk.

The key file holds the 32-byte seed, hex-encoded, readable only by its owner
(0600).  The same seed gives the same libp2p peer id after every restart, and
the same key signs DHT records and run-document updates.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gossamer.node.errors import ConfigError

KEY_FILE_NAME = "identity.key"


@dataclass(frozen=True)
class Identity:
    """An Ed25519 keypair plus the libp2p peer id derived from it."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise ConfigError(f"an Ed25519 seed is 32 bytes, got {len(self.seed)}")

    @classmethod
    def generate(cls) -> Identity:
        return cls(os.urandom(32))

    @functools.cached_property
    def private_key(self) -> Ed25519PrivateKey:
        # cached: deriving the key object costs ~40 µs, a signature ~40 µs more
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @functools.cached_property
    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key_bytes)


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``data``."""
    from cryptography.exceptions import InvalidSignature

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


# libp2p peer ids for Ed25519 keys are the identity multihash of the protobuf
# encoded public key: 0x00 (identity), 0x24 (length 36), then the protobuf
# {Type: Ed25519 (1), Data: 32 bytes}.
_ED25519_PROTOBUF_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, 0x24])


def peer_id_from_public_key(public_key: bytes) -> str:
    """The base58 libp2p peer id of an Ed25519 public key (no libp2p import needed)."""
    import base58

    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return base58.b58encode(
        _IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX + public_key
    ).decode()


def peer_id_to_bytes(peer_id: str) -> bytes:
    """The binary form of a base58 peer id (as the relay and DCUtR protobufs carry it);
    ValueError if it is not base58."""
    import base58

    return base58.b58decode(peer_id)


def peer_id_from_bytes(raw: bytes) -> str:
    """The base58 text of a binary peer id."""
    import base58

    return base58.b58encode(raw).decode()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The Ed25519 public key embedded in a peer id; ValueError if it holds none."""
    import base58

    try:
        raw = base58.b58decode(peer_id)
    except ValueError as exc:
        raise ValueError(f"not a base58 peer id: {peer_id!r}") from exc
    prefix = _IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTOBUF_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise ValueError(f"peer id {peer_id!r} does not embed an Ed25519 key")
    return raw[len(prefix) :]


def load_or_create(data_dir: Path) -> Identity:
    """Load the node key from ``data_dir``, creating it (mode 0600) on first start."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / KEY_FILE_NAME
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{path} is readable by others (mode {mode:o}); run `chmod 600 {path}`"
            )
        text = path.read_text().strip()
        try:
            return Identity(bytes.fromhex(text))
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{path} does not hold a 32-byte hex Ed25519 seed") from exc
    identity = Identity.generate()
    # Create with 0600 from the start: a chmod after writing would leave a window.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(identity.seed.hex() + "\n")
    return identity
