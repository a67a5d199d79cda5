"""Typed errors of the node layer.

Everything a remote peer can make go wrong surfaces as a subclass of
:class:`GossamerError`, so callers can tell "the peer refused" from "the peer
is gone" from "the bytes were corrupted" without parsing messages.
"""

from __future__ import annotations


class GossamerError(Exception):
    """Base class of every error gossamer raises on purpose."""


class ConfigError(GossamerError, ValueError):
    """A configuration value is missing, unknown or malformed."""


class ProtocolError(GossamerError):
    """A peer sent bytes that do not follow the protocol (bad frame, bad msgpack, bad field)."""


class FrameTooLarge(ProtocolError):
    """A length-prefixed frame is larger than the limit for its protocol."""

    def __init__(self, size: int, limit: int, what: str = "frame") -> None:
        super().__init__(f"{what} of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class PeerUnreachable(GossamerError):
    """No connection to the peer could be made (or it dropped before answering)."""


class DeadlineExceeded(GossamerError):
    """A call did not complete before its deadline."""


class Refused(GossamerError):
    """Raised by an RPC handler to refuse a request on purpose.

    The caller receives a :class:`RemoteRefused` that carries ``code`` and the
    message; nothing else about the handler's internals leaves the node.
    """

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RemoteError(GossamerError):
    """The remote peer answered with an error.

    ``code`` is machine-readable (``refused``, ``bad_request``, ``unknown_method``,
    ``too_large``, ``deadline``, ``internal``), ``message`` says why.
    """

    code = "remote"

    def __init__(self, message: str, *, code: str | None = None, peer: str = "", method: str = ""):
        self.message = message
        if code is not None:
            self.code = code
        self.peer = peer
        self.method = method
        where = f"{peer[-8:]}:{method}" if peer or method else "remote"
        super().__init__(f"{where} answered {self.code}: {message}")


class RemoteRefused(RemoteError):
    """The remote handler refused the request (it raised :class:`Refused`)."""

    code = "refused"


class RemoteBadRequest(RemoteError):
    """The remote could not decode or validate our request."""

    code = "bad_request"


class RemoteUnknownMethod(RemoteError):
    """The remote has no such service method."""

    code = "unknown_method"


class RemoteTooLarge(RemoteError):
    """The remote refused our request because it exceeds its size limit."""

    code = "too_large"


class RemoteDeadline(RemoteError):
    """The remote handler ran out of the time we gave it."""

    code = "deadline"


class RemoteInternalError(RemoteError):
    """The remote handler crashed; the message names the exception type."""

    code = "internal"


class RequestTooLarge(GossamerError):
    """Our own request is larger than the service allows; it was not sent."""


class ResponseTooLarge(ProtocolError):
    """The remote's response exceeds the limit we accept."""


_REMOTE_BY_CODE: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        RemoteRefused,
        RemoteBadRequest,
        RemoteUnknownMethod,
        RemoteTooLarge,
        RemoteDeadline,
        RemoteInternalError,
    )
}


def remote_error_for(code: str, message: str, *, peer: str = "", method: str = "") -> RemoteError:
    """Build the typed exception for an error response received from ``peer``."""
    cls = _REMOTE_BY_CODE.get(code)
    if cls is None:
        # A refusal with an application-specific code is still a refusal.
        return RemoteRefused(message, code=code, peer=peer, method=method)
    return cls(message, peer=peer, method=method)


class TransferError(GossamerError):
    """A tensor transfer failed."""


class IntegrityError(TransferError):
    """Bytes of a transfer failed authentication: corrupted or forged in flight."""


class TruncatedTransfer(TransferError):
    """The channel ended before the whole transfer arrived."""


class ChannelClosed(TransferError):
    """The data channel to the peer is closed."""


class SpecMismatch(TransferError):
    """The incoming tensors do not match the memory the receiver prepared."""
