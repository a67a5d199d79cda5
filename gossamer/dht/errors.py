"""Typed errors of the DHT layer."""

from __future__ import annotations

from gossamer.node import GossamerError


class DHTError(GossamerError):
    """Base class of DHT errors."""


class InvalidKey(DHTError):
    """A key or sub-key is not in the form the DHT accepts."""


class InvalidRecord(DHTError):
    """A record failed validation (bad signature, wrong owner, expired, malformed ...).

    ``code`` is the machine-readable reason a storing node sends back.
    """

    code = "invalid_record"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class RecordTooLarge(InvalidRecord):
    """A value, or a key's total size, exceeds the DHT's bounds."""

    code = "too_large"


class QuotaExceeded(InvalidRecord):
    """The storing node holds as many records from this peer (or in total) as it accepts."""

    code = "quota"


class StoreFailed(DHTError):
    """No node accepted a record (each refusal or failure is in ``reasons``)."""

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons or []
