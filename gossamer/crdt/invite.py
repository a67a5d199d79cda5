"""Invite tokens: how the creator of a restricted run lets in a peer it does not know yet.

A token is signed by the run's creator (the key the run id names) and says: whoever presents
this before ``expires`` may join run ``run_id``, at most ``uses`` times (0: any number). The
joiner sends it in its crdt hello (:mod:`.handshake`); the creator's node checks it
(:meth:`Invite.check`: signature, run, expiry), counts its use (:class:`InviteLedger`, on disk,
so a restart does not refill a single-use token) and admits the joiner by amending the charter
(``allow`` += the joiner). Only the creator can amend the charter, so only the creator's node
redeems; every other member refuses the hello as before and says whom to ask.

Text form: ``gsi1.`` + base64url(msgpack ``[body, signature]``), the signature over
``"gossamer/invite/1\\0" ‖ body``; ``body`` is the msgpack map {run, id, expires, uses}. A token
is at most :data:`MAX_INVITE_BYTES`; ``id`` (16 random bytes) names it in the ledger.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gossamer.crdt.charter import Charter, CharterError, check_run_id
from gossamer.node import GossamerError, Identity, ProtocolError, verify_signature, wire

DOMAIN = b"gossamer/invite/1\x00"
PREFIX = "gsi1."
MAX_INVITE_BYTES = 512
MAX_TTL_S = 365 * 24 * 3600.0
MAX_USES = 1_000_000


class InviteError(GossamerError):
    """An invite token is malformed, forged, for another run, expired or used up."""


@dataclass(frozen=True)
class Invite:
    run_id: str
    token_id: bytes
    expires: float  # unix time
    uses: int  # 0: unlimited
    signature: bytes = field(default=b"", compare=False)

    @classmethod
    def create(
        cls,
        identity: Identity,
        run_id: str,
        *,
        ttl: float = 24 * 3600.0,
        uses: int = 1,
        now: float | None = None,
    ) -> Invite:
        """A token for ``run_id`` valid ``ttl`` seconds, for ``uses`` joins; ``identity`` must
        be the run's creator (else nobody would accept it, so we refuse to make it)."""
        check_run_id(run_id)
        name = run_id.rsplit("-", 1)[0]
        if Charter.create(identity, name, created=0.0).run_id != run_id:
            raise InviteError(f"this identity did not create run {run_id}: it cannot invite")
        if not 0 < ttl <= MAX_TTL_S:
            raise InviteError(f"ttl must be between 0 and {MAX_TTL_S:.0f} s, not {ttl!r}")
        if not 0 <= uses <= MAX_USES:
            raise InviteError(f"uses must be between 0 (unlimited) and {MAX_USES}")
        now = time.time() if now is None else now
        invite = cls(run_id, secrets.token_bytes(16), round(now + ttl, 3), int(uses))
        return invite._signed(identity)

    def _body(self) -> bytes:
        return wire.pack(
            {"run": self.run_id, "id": self.token_id, "expires": self.expires, "uses": self.uses}
        )

    def _signed(self, identity: Identity) -> Invite:
        return Invite(
            self.run_id,
            self.token_id,
            self.expires,
            self.uses,
            identity.sign(DOMAIN + self._body()),
        )

    def encode(self) -> bytes:
        return wire.pack([self._body(), self.signature])

    def text(self) -> str:
        return PREFIX + base64.urlsafe_b64encode(self.encode()).decode().rstrip("=")

    @classmethod
    def parse(cls, text: str) -> Invite:
        """The invite a ``gsi1.…`` string holds (signature not yet checked: see :meth:`check`)."""
        if not isinstance(text, str) or not text.startswith(PREFIX):
            raise InviteError(f"an invite token starts with {PREFIX!r}")
        body = text[len(PREFIX) :].strip()
        if len(body) > MAX_INVITE_BYTES * 2:
            raise InviteError("invite token too long")
        try:
            blob = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise InviteError("an invite token is base64url after its prefix") from None
        return cls.decode(blob)

    @classmethod
    def decode(cls, blob: bytes) -> Invite:
        if not isinstance(blob, bytes) or len(blob) > MAX_INVITE_BYTES:
            raise InviteError(f"an invite is at most {MAX_INVITE_BYTES} bytes")
        try:
            outer = wire.unpack(blob, max_container=8, max_objects=16, max_depth=2)
            if not (isinstance(outer, list) and len(outer) == 2):
                raise InviteError("an invite is [body, signature]")
            body, signature = outer
            if not isinstance(body, bytes) or not isinstance(signature, bytes):
                raise InviteError("invite body and signature must be bytes")
            fields = wire.unpack(body, max_container=8, max_objects=16, max_depth=2)
        except ProtocolError as exc:
            raise InviteError(f"malformed invite: {exc}") from None
        if not isinstance(fields, dict) or set(fields) != {"run", "id", "expires", "uses"}:
            raise InviteError("an invite body is the map {run, id, expires, uses}")
        run_id, token_id, expires, uses = (fields[k] for k in ("run", "id", "expires", "uses"))
        if not isinstance(run_id, str) or not isinstance(token_id, bytes) or len(token_id) != 16:
            raise InviteError("invite run must be a run id and id 16 bytes")
        if not isinstance(expires, (int, float)) or isinstance(expires, bool):
            raise InviteError("invite expiry must be a number")
        if not isinstance(uses, int) or isinstance(uses, bool) or not 0 <= uses <= MAX_USES:
            raise InviteError("invite uses must be a small non-negative integer")
        try:
            check_run_id(run_id)
        except CharterError as exc:
            raise InviteError(str(exc)) from None
        invite = cls(run_id, token_id, float(expires), uses, signature)
        if invite._body() != body:
            raise InviteError("invite body is not in canonical form")
        return invite

    def check(self, charter: Charter, now: float) -> None:
        """InviteError unless this invite was signed by ``charter``'s creator for its run and
        has not expired."""
        if self.run_id != charter.run_id:
            raise InviteError(f"the invite is for run {self.run_id}, not {charter.run_id}")
        if not verify_signature(charter.creator, self.signature, DOMAIN + self._body()):
            raise InviteError("the invite's signature does not verify (forged or altered)")
        if now >= self.expires:
            raise InviteError("the invite has expired")


class InviteLedger:
    """How many times each invite of one run was redeemed, kept in ``path`` (JSON).

    Written (atomically) before the charter that admits the joiner, so a crash in between
    spends a use rather than handing out one more than the creator allowed.
    """

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self._used: dict[str, list[float]] = {}  # token id hex -> [uses, expires]
        if path is not None and path.exists():
            try:
                raw = json.loads(path.read_text())
                self._used = {str(k): [float(v[0]), float(v[1])] for k, v in dict(raw).items()}
            except (ValueError, TypeError, IndexError, KeyError, OSError):
                self._used = {}

    def used(self, invite: Invite) -> int:
        return int(self._used.get(invite.token_id.hex(), [0, 0])[0])

    def redeem(self, invite: Invite) -> None:
        """Count one use of ``invite``; InviteError if it has none left."""
        if invite.uses and self.used(invite) >= invite.uses:
            raise InviteError(f"the invite was used {self.used(invite)} time(s) already")
        now = self.clock()
        # forget tokens long expired: the ledger stays as small as the live invites
        self._used = {k: v for k, v in self._used.items() if v[1] > now}
        self._used[invite.token_id.hex()] = [self.used(invite) + 1, invite.expires]
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._used))
        os.replace(tmp, self.path)
