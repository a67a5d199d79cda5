"""The run charter: who may host, read and write a run, signed by the run's creator.

A run id names its creator's key: ``<name>-<16 base32 chars of SHA-256(key)>``,
so nobody else can publish a charter for it.  The charter lists the hosts
(peers allowed to write the run's config; the creator is always one), the
access mode (``open``: anyone may join; ``restricted``: only the hosts and the
peers in ``allow``), the peers revoked from the run (``deny``: refused whatever the mode,
so an open run can still put out a member) and a version.  The creator amends it by signing a higher
version; peers adopt the highest valid version they see (it travels in the
sync handshake).

The charter lives beside the CRDT document, not inside it: permission checks
must give the same answer on every replica for the same update, and an
allow-list edited concurrently inside the document could not promise that.

Encoding: msgpack ``[body, signature]`` where ``body`` is the msgpack map below
and the signature covers ``"gossamer/charter/1\\0" ‖ body``.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass, field, replace

from gossamer.node import (
    GossamerError,
    Identity,
    ProtocolError,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
    wire,
)

DOMAIN = b"gossamer/charter/1\x00"
RUN_DOMAIN = b"gossamer/run/1\x00"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.]{0,47}$")
RUN_ID_RE = re.compile(r"^([a-z0-9][a-z0-9_.]{0,47})-([a-z2-7]{16})$")
ACCESS_MODES = ("open", "restricted")
MAX_LIST = 10_000
MAX_CHARTER_BYTES = 1 << 20


class CharterError(GossamerError):
    """A charter is malformed, badly signed, or does not belong to its run id."""


def run_id_for(name: str, creator_key: bytes) -> str:
    if not NAME_RE.match(name):
        raise CharterError(
            f"run name {name!r}: use 1–48 lowercase letters, digits, '_' or '.', "
            "starting with a letter or digit"
        )
    digest = hashlib.sha256(RUN_DOMAIN + creator_key).digest()
    return f"{name}-{base64.b32encode(digest).decode()[:16].lower()}"


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID_RE.match(run_id):
        raise CharterError(f"{run_id!r} is not a run id (<name>-<16 base32 characters>)")
    return run_id


def _check_peer_id(peer_id: object, what: str) -> str:
    if not isinstance(peer_id, str):
        raise CharterError(f"{what} must be peer id strings")
    try:
        public_key_from_peer_id(peer_id)
    except ValueError:
        raise CharterError(f"{what}: {peer_id!r} is not an Ed25519 peer id") from None
    return peer_id


@dataclass(frozen=True)
class Charter:
    name: str
    creator: bytes
    hosts: tuple[str, ...]
    access: str = "open"
    allow: frozenset[str] = frozenset()
    deny: frozenset[str] = frozenset()
    version: int = 1
    created: float = 0.0
    signature: bytes = field(default=b"", compare=False)

    # ---------------------------------------------------------------- queries

    @property
    def run_id(self) -> str:
        return run_id_for(self.name, self.creator)

    @property
    def creator_peer_id(self) -> str:
        return peer_id_from_public_key(self.creator)

    def is_host(self, peer_id: str) -> bool:
        return peer_id in self.hosts

    def may_join(self, peer_id: str) -> bool:
        """May ``peer_id`` read the run and write its own records?"""
        if peer_id in self.hosts:
            return True
        if peer_id in self.deny:
            return False
        return self.access == "open" or peer_id in self.allow

    # ------------------------------------------------------------- creation

    @classmethod
    def create(
        cls,
        identity: Identity,
        name: str,
        *,
        hosts: list[str] | tuple[str, ...] = (),
        access: str = "open",
        allow: list[str] | tuple[str, ...] | frozenset[str] = (),
        created: float | None = None,
    ) -> Charter:
        run_id_for(name, identity.public_key_bytes)  # validates the name
        me = identity.peer_id
        charter = cls(
            name=name,
            creator=identity.public_key_bytes,
            hosts=tuple(dict.fromkeys([me, *hosts])),
            access=access,
            allow=frozenset(allow),
            version=1,
            created=time.time() if created is None else created,
        )
        charter._validate()
        return charter._signed(identity)

    def amend(
        self,
        identity: Identity,
        *,
        hosts: list[str] | tuple[str, ...] | None = None,
        access: str | None = None,
        allow: list[str] | tuple[str, ...] | frozenset[str] | None = None,
        deny: list[str] | tuple[str, ...] | frozenset[str] | None = None,
    ) -> Charter:
        """A new version signed by the creator (only the creator may amend)."""
        if identity.public_key_bytes != self.creator:
            raise CharterError("only the run's creator can amend its charter")
        changed = replace(
            self,
            hosts=self.hosts if hosts is None else tuple(dict.fromkeys([identity.peer_id, *hosts])),
            access=self.access if access is None else access,
            allow=self.allow if allow is None else frozenset(allow),
            deny=self.deny if deny is None else frozenset(deny),
            version=self.version + 1,
            signature=b"",
        )
        changed._validate()
        return changed._signed(identity)

    def admit(self, identity: Identity, peer_id: str) -> Charter:
        """The next version with ``peer_id`` allowed in (and no longer revoked)."""
        _check_peer_id(peer_id, "admit")
        return self.amend(identity, allow=self.allow | {peer_id}, deny=self.deny - {peer_id})

    def revoke(self, identity: Identity, peer_id: str) -> Charter:
        """The next version with ``peer_id`` refused (taken off ``allow``, put on ``deny``)."""
        _check_peer_id(peer_id, "revoke")
        if peer_id in self.hosts:
            raise CharterError("a host cannot be revoked; amend the hosts first")
        return self.amend(identity, allow=self.allow - {peer_id}, deny=self.deny | {peer_id})

    def _body(self) -> bytes:
        fields: dict[str, object] = {
            "name": self.name,
            "creator": self.creator,
            "hosts": list(self.hosts),
            "access": self.access,
            "allow": sorted(self.allow),
            "version": self.version,
            "created": self.created,
        }
        if self.deny:  # absent when empty, so charters written before it keep their bytes
            fields["deny"] = sorted(self.deny)
        return wire.pack(fields)

    def _signed(self, identity: Identity) -> Charter:
        return replace(self, signature=identity.sign(DOMAIN + self._body()))

    def _validate(self) -> None:
        run_id_for(self.name, self.creator)
        if self.access not in ACCESS_MODES:
            raise CharterError(f"access must be one of {ACCESS_MODES}, not {self.access!r}")
        if max(len(self.hosts), len(self.allow), len(self.deny)) > MAX_LIST:
            raise CharterError(f"at most {MAX_LIST} hosts, allowed and revoked peers")
        for peer in self.hosts:
            _check_peer_id(peer, "hosts")
        for peer in self.allow:
            _check_peer_id(peer, "allow")
        for peer in self.deny:
            _check_peer_id(peer, "deny")
        if self.creator_peer_id not in self.hosts:
            raise CharterError("the creator must be a host")
        if not isinstance(self.version, int) or self.version < 1:
            raise CharterError("version must be a positive integer")

    # ------------------------------------------------------------- encoding

    def encode(self) -> bytes:
        return wire.pack([self._body(), self.signature])

    @classmethod
    def decode(cls, blob: bytes, run_id: str | None = None) -> Charter:
        """Parse and verify a charter; with ``run_id``, also check it belongs to that run."""
        if not isinstance(blob, bytes) or len(blob) > MAX_CHARTER_BYTES:
            raise CharterError("a charter is at most 1 MiB of bytes")
        try:
            outer = wire.unpack(blob, max_container=8)
            if not (isinstance(outer, list) and len(outer) == 2):
                raise CharterError("a charter is [body, signature]")
            body, signature = outer
            if not isinstance(body, bytes) or not isinstance(signature, bytes):
                raise CharterError("charter body and signature must be bytes")
            fields = wire.unpack(body, max_container=MAX_LIST)
        except ProtocolError as exc:
            raise CharterError(f"malformed charter: {exc}") from None
        if not isinstance(fields, dict):
            raise CharterError("a charter body is a map")
        try:
            charter = cls(
                name=fields["name"],
                creator=fields["creator"],
                hosts=tuple(fields["hosts"]),
                access=fields["access"],
                allow=frozenset(fields["allow"]),
                deny=frozenset(fields.get("deny", ())),
                version=fields["version"],
                created=float(fields["created"]),
                signature=signature,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CharterError(f"charter field missing or of the wrong type: {exc}") from None
        if not isinstance(charter.name, str) or not isinstance(charter.creator, bytes):
            raise CharterError("charter name must be a string and creator bytes")
        if len(charter.creator) != 32:
            raise CharterError("charter creator must be a 32-byte Ed25519 key")
        charter._validate()
        if charter._body() != body:
            raise CharterError("charter body is not in canonical form")
        if not verify_signature(charter.creator, signature, DOMAIN + body):
            raise CharterError("charter signature does not verify")
        if run_id is not None and charter.run_id != run_id:
            raise CharterError(f"charter is for run {charter.run_id}, not {run_id}")
        return charter
