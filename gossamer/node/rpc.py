"""Request/response RPC over libp2p streams.

A service is a class with ``@rpc`` methods; each service gets its own protocol
id, ``/gossamer/<name>/<version>``.  A request is one length-prefixed msgpack
frame ``{"i": id, "m": method, "p": {params}, "t": timeout_ms}``; the answer is
``{"i": id, "r": result}`` or ``{"i": id, "e": code, "x": message}``.

Streams are reused: opening a yamux stream costs ~6 ms here against ~1 ms for
a round trip on an open one, so the client keeps idle streams per (peer,
protocol) and the server serves requests on a stream until it closes.  A call
that is cancelled or fails mid-way resets its stream instead of returning it.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, get_type_hints

import trio

from gossamer.node import wire
from gossamer.node.errors import (
    DeadlineExceeded,
    FrameTooLarge,
    GossamerError,
    PeerUnreachable,
    ProtocolError,
    Refused,
    RemoteError,
    RequestTooLarge,
    ResponseTooLarge,
    remote_error_for,
)

if TYPE_CHECKING:
    from gossamer.node.host import Stream
    from gossamer.node.node import Node

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# The deadline a server applies when the caller sent none, and the longest it
# ever grants, whatever the caller asks for.
SERVER_DEFAULT_TIMEOUT_S = 30.0
SERVER_MAX_TIMEOUT_S = 600.0
IDLE_STREAMS_PER_KEY = 8
# Once a request frame has begun, the rest must follow within this time: an
# idle stream may wait forever for its next request, a half-sent one may not.
FRAME_COMPLETION_TIMEOUT_S = 10.0
MAX_ERROR_TEXT = 200  # an error message we send is ours and short


@dataclass(frozen=True)
class CallContext:
    """What a handler knows about the call besides its parameters."""

    peer_id: str
    service: str
    method: str
    deadline: float  # trio.current_time() value


@dataclass(frozen=True)
class _MethodSpec:
    name: str
    func: Callable[..., Awaitable[Any]]
    params: dict[str, inspect.Parameter]
    types: dict[str, Any]
    accepts_extra: bool


def rpc(func: F) -> F:
    """Mark a ``Service`` coroutine method as callable by peers.

    The method receives a :class:`CallContext` first, then keyword parameters
    decoded from the request.  Parameters are checked against the method's
    signature (names, required ones, simple annotations) before the call;
    raise :class:`Refused` to refuse with a reason the caller will see.
    """
    if not inspect.iscoroutinefunction(func):
        raise TypeError(f"@rpc method {func.__qualname__} must be async")
    func.__gossamer_rpc__ = True  # type: ignore[attr-defined]
    return func


class Service:
    """Base class of RPC services; subclasses set ``name`` and define ``@rpc`` methods."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1.0.0"
    # None: the node's rpc_max_request_bytes / rpc_max_response_bytes
    max_request_bytes: ClassVar[int | None] = None
    max_response_bytes: ClassVar[int | None] = None

    @classmethod
    def protocol_id(cls) -> str:
        return protocol_id(cls.name, cls.version)


def protocol_id(name: str, version: str = "1.0.0") -> str:
    return f"/gossamer/{name}/{version}"


_SIMPLE_TYPES = {int, float, str, bytes, bool, list, dict, type(None)}


def _check_type(value: Any, annotation: Any) -> bool:
    """Shallow check of a decoded value against a simple annotation.

    msgpack gives us int/float/str/bytes/bool/list/dict/None only, so checking
    the outer type is what matters; anything fancier is the handler's job.
    """
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in _SIMPLE_TYPES:
        return isinstance(value, annotation)
    origin = getattr(annotation, "__origin__", None)
    if origin in (list, dict):
        return isinstance(value, origin)
    args = getattr(annotation, "__args__", None)
    if args and type(annotation).__name__ in ("UnionType", "_UnionGenericAlias"):
        return any(_check_type(value, arg) for arg in args)
    return True


def _describe(service: Service) -> dict[str, _MethodSpec]:
    methods: dict[str, _MethodSpec] = {}
    for attr in dir(type(service)):
        func = getattr(service, attr, None)
        if not getattr(func, "__gossamer_rpc__", False):
            continue
        signature = inspect.signature(func)
        params = list(signature.parameters.values())
        if not params:
            raise TypeError(f"@rpc method {attr} must accept a CallContext first")
        try:
            hints = get_type_hints(func)
        except Exception:  # unresolvable forward refs: fall back to no type checks
            hints = {}
        named = {p.name: p for p in params[1:] if p.kind != p.VAR_KEYWORD}
        methods[attr] = _MethodSpec(
            name=attr,
            func=func,
            params=named,
            types={name: hints.get(name, p.annotation) for name, p in named.items()},
            accepts_extra=any(p.kind == p.VAR_KEYWORD for p in params),
        )
    return methods


def _validate_params(spec: _MethodSpec, params: Any) -> dict[str, Any]:
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ProtocolError("params must be a map with string keys")
    unknown = set(params) - set(spec.params)
    if unknown and not spec.accepts_extra:
        raise ProtocolError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    for name, param in spec.params.items():
        if name not in params:
            if param.default is inspect.Parameter.empty:
                raise ProtocolError(f"missing parameter {name!r}")
            continue
        if not _check_type(params[name], spec.types[name]):
            expected = getattr(spec.types[name], "__name__", str(spec.types[name]))
            raise ProtocolError(
                f"parameter {name!r} must be {expected}, got {type(params[name]).__name__}"
            )
    return params


def decode_request(payload: bytes) -> tuple[int, str, Any, float | None]:
    """Parse a request frame's payload; ProtocolError if it is not a valid request."""
    return parse_request(wire.unpack(payload))


async def decode_request_async(payload: bytes) -> tuple[int, str, Any, float | None]:
    """:func:`decode_request`, decoding a large payload off the event loop."""
    return parse_request(await wire.unpack_async(payload))


def parse_request(message: Any) -> tuple[int, str, Any, float | None]:
    """Check a decoded request (any msgpack value); ProtocolError if it is not a request."""
    if not isinstance(message, dict):
        raise ProtocolError("a request must be a map")
    call_id, method, params = message.get("i"), message.get("m"), message.get("p", {})
    timeout_ms = message.get("t")
    if not isinstance(call_id, int) or isinstance(call_id, bool) or not 0 <= call_id < 2**63:
        raise ProtocolError("request id must be a non-negative integer")
    if not isinstance(method, str) or not 0 < len(method) <= 128:
        raise ProtocolError("method must be a non-empty string")
    if timeout_ms is not None and (
        not isinstance(timeout_ms, int | float)
        or isinstance(timeout_ms, bool)
        or not math.isfinite(timeout_ms)
        or timeout_ms <= 0
    ):
        raise ProtocolError("timeout must be a positive number of milliseconds")
    return call_id, method, params, None if timeout_ms is None else timeout_ms / 1000


def decode_response(payload: bytes) -> tuple[int, bool, Any]:
    """Parse a response: (id, ok, result-or-(code, message))."""
    message = wire.unpack(payload)
    if not isinstance(message, dict) or not isinstance(message.get("i"), int):
        raise ProtocolError("a response must be a map with an integer id")
    if "r" in message:
        return message["i"], True, message["r"]
    code, text = message.get("e"), message.get("x", "")
    if not isinstance(code, str) or not isinstance(text, str):
        raise ProtocolError("an error response needs string 'e' and 'x'")
    return message["i"], False, (code, text)


class RpcServer:
    """Serves registered services on their protocol ids."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._services: dict[str, tuple[Service, dict[str, _MethodSpec]]] = {}
        self._active: defaultdict[str, int] = defaultdict(int)
        self._incidents = itertools.count(1)
        self._active_total = 0
        self._idle: OrderedDict[Stream, None] = OrderedDict()  # open streams awaiting a request

    def register(self, service: Service) -> None:
        if not service.name or "/" in service.name:
            raise ValueError("a Service needs a non-empty name without '/'")
        pid = service.protocol_id()
        if pid in self._services:
            raise ValueError(f"service {pid} is already registered")
        self._services[pid] = (service, _describe(service))
        self._node.set_stream_handler(pid, self._serve_stream)

    @property
    def protocols(self) -> list[str]:
        return sorted(self._services)

    async def _serve_stream(self, stream: Stream) -> None:
        service, methods = self._services[stream.protocol]
        config = self._node.config
        limit = service.max_request_bytes or config.rpc_max_request_bytes
        peer = stream.peer_id
        if self._active[peer] >= config.rpc_max_concurrent_streams_per_peer:
            self._node.misbehaved(
                log, peer, 10, "rpc: %s opened too many concurrent streams; resetting", peer[-8:]
            )
            await stream.reset()
            return
        if self._active_total >= config.rpc_max_concurrent_streams:
            # many peers together: nobody's fault, so no score.  An idle stream (kept open by
            # a client's pool) makes room; with none idle, the new one is reset unanswered.
            if self._idle:
                idle, _ = self._idle.popitem(last=False)
                await idle.reset()
            else:
                self._node.complaints.log(
                    log, "rpc:total", "rpc: %d streams busy; resetting new ones", self._active_total
                )
                await stream.reset()
                return
        self._active[peer] += 1
        self._active_total += 1
        reader = wire.FrameReader(stream)
        try:
            while True:
                try:
                    self._idle[stream] = None
                    try:
                        readable = await reader.wait_readable()
                    finally:
                        self._idle.pop(stream, None)
                    if not readable:
                        return
                    with trio.fail_after(FRAME_COMPLETION_TIMEOUT_S):
                        payload = await reader.read_frame(limit, "request")
                except trio.TooSlowError:
                    # a slow link can do this too: logged (once a minute), not scored
                    self._node.complaints.log(
                        log, peer, "rpc %s from %s: request frame stalled", service.name, peer[-8:]
                    )
                    await stream.reset()
                    return
                except FrameTooLarge as exc:
                    self._node.misbehaved(
                        log, peer, 10, "rpc %s from %s: %s", service.name, peer[-8:], exc
                    )
                    await self._send_error(stream, 0, "too_large", str(exc))
                    # the rest of the oversize frame is still in flight: framing is lost
                    await stream.reset()
                    return
                except EOFError:  # what a peer that goes away mid-request does
                    log.debug("rpc %s from %s: stream ended mid-frame", service.name, peer[-8:])
                    return
                if payload is None:
                    return
                self._node.peers.saw(peer)
                await self._handle_one(stream, service, methods, payload)
        except ConnectionError as exc:
            log.debug("rpc %s stream from %s ended: %s", service.name, peer[-8:], exc)
        finally:
            self._active[peer] -= 1
            self._active_total -= 1
            if not self._active[peer]:
                del self._active[peer]
            await stream.close()

    async def _handle_one(
        self,
        stream: Stream,
        service: Service,
        methods: dict[str, _MethodSpec],
        payload: bytes,
    ) -> None:
        peer = stream.peer_id
        try:
            call_id, method, params, timeout = await decode_request_async(payload)
        except ProtocolError as exc:
            self._node.misbehaved(
                log, peer, 10, "rpc %s: bad request from %s: %s", service.name, peer[-8:], exc
            )
            await self._send_error(stream, 0, "bad_request", str(exc))
            return
        spec = methods.get(method)
        if spec is None:
            await self._send_error(
                stream, call_id, "unknown_method", f"{service.name} has no method {method!r}"
            )
            return
        try:
            params = _validate_params(spec, params)
        except ProtocolError as exc:
            await self._send_error(stream, call_id, "bad_request", str(exc))
            return
        timeout = min(timeout or SERVER_DEFAULT_TIMEOUT_S, SERVER_MAX_TIMEOUT_S)
        context = CallContext(peer, service.name, method, trio.current_time() + timeout)
        try:
            with trio.move_on_after(timeout) as scope:
                result = await spec.func(context, **params)
            if scope.cancelled_caught:
                await self._send_error(
                    stream, call_id, "deadline", f"{method} did not finish in {timeout:.3f} s"
                )
                return
        except Refused as exc:
            await self._send_error(stream, call_id, exc.code, exc.message)
            return
        except Exception as exc:
            # A crashing handler must not take the node down.  The caller learns the code and an
            # incident number to quote, never the exception's text (it may hold our internals);
            # our log has the type (once per peer per minute) and, at debug, the traceback.
            incident = next(self._incidents)
            self._node.complaints.log(
                log,
                peer,
                "rpc %s.%s from %s failed (incident %d): %s",
                service.name,
                method,
                peer[-8:],
                incident,
                type(exc).__name__,
            )
            log.debug("rpc incident %d", incident, exc_info=True)
            await self._send_error(
                stream, call_id, "internal", f"internal error (incident {incident})"
            )
            return
        try:
            body = wire.pack({"i": call_id, "r": result})
        except (TypeError, ValueError, OverflowError) as exc:
            log.warning("rpc %s.%s returned an unencodable result: %s", service.name, method, exc)
            await self._send_error(stream, call_id, "internal", "handler returned unencodable data")
            return
        limit = service.max_response_bytes or self._node.config.rpc_max_response_bytes
        if len(body) > limit:
            log.warning(
                "rpc %s.%s response of %d bytes over limit", service.name, method, len(body)
            )
            await self._send_error(
                stream, call_id, "internal", f"response of {len(body)} bytes exceeds {limit}"
            )
            return
        await stream.write(wire.frame(body))

    async def _send_error(self, stream: Stream, call_id: int, code: str, message: str) -> None:
        # If the peer went away there is nothing left to tell it.
        with contextlib.suppress(ConnectionError):
            await stream.write(
                wire.frame(wire.pack({"i": call_id, "e": code, "x": message[:MAX_ERROR_TEXT]}))
            )


class RpcClient:
    """Calls services on other peers, reusing idle streams."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._idle: defaultdict[tuple[str, str], list[tuple[Stream, wire.FrameReader]]] = (
            defaultdict(list)
        )
        self._ids = itertools.count(1)

    def forget_peer(self, peer_id: str) -> None:
        """Drop idle streams to a peer that disconnected."""
        for key in [k for k in self._idle if k[0] == peer_id]:
            del self._idle[key]

    async def call(
        self,
        peer_id: str,
        service: str | type[Service],
        method: str,
        params: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        max_response_bytes: int | None = None,
    ) -> Any:
        """Call ``service.method(**params)`` on ``peer_id`` and return its result.

        Raises DeadlineExceeded when ``timeout`` (default: the node's
        rpc_default_timeout) passes, PeerUnreachable when no stream can be
        opened, RequestTooLarge before sending an oversize request, and a
        RemoteError subclass when the peer answers with an error.
        """
        config = self._node.config
        if isinstance(service, str):
            pid, request_limit = protocol_id(service), config.rpc_max_request_bytes
            response_limit = max_response_bytes or config.rpc_max_response_bytes
        else:
            pid = service.protocol_id()
            request_limit = service.max_request_bytes or config.rpc_max_request_bytes
            response_limit = (
                max_response_bytes or service.max_response_bytes or config.rpc_max_response_bytes
            )
        timeout = config.rpc_default_timeout if timeout is None else timeout
        call_id = next(self._ids)
        try:
            body = wire.pack(
                {"i": call_id, "m": method, "p": params or {}, "t": max(1, int(timeout * 1000))}
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise GossamerError(f"rpc params are not msgpack-encodable: {exc}") from None
        if len(body) > request_limit:
            raise RequestTooLarge(
                f"request to {method} is {len(body)} bytes; the limit is {request_limit}"
            )
        request = wire.frame(body)
        with trio.move_on_after(timeout) as scope:
            return await self._exchange(peer_id, pid, method, call_id, request, response_limit)
        assert scope.cancelled_caught
        raise DeadlineExceeded(f"{method} on {peer_id[-8:]} took longer than {timeout:.3f} s")

    async def _exchange(
        self, peer_id: str, pid: str, method: str, call_id: int, request: bytes, limit: int
    ) -> Any:
        key = (peer_id, pid)
        for attempt in range(2):
            reused = bool(self._idle[key])
            stream, reader = self._idle[key].pop() if reused else await self._open(peer_id, pid)
            done = False
            try:
                await stream.write(request)
                payload = await reader.read_frame(limit, "response")
                if payload is None:
                    raise ConnectionError("stream closed before the response")
                got_id, ok, value = decode_response(payload)
                if got_id not in (call_id, 0):
                    raise ProtocolError(f"response id {got_id} does not match request {call_id}")
                done = True
            except ConnectionError as exc:
                # An idle stream may have died while pooled (peer restarted):
                # retry once on a fresh one.  A fresh stream failing is final.
                if reused and attempt == 0:
                    continue
                raise PeerUnreachable(f"{method} on {peer_id[-8:]}: {exc}") from None
            except FrameTooLarge as exc:
                raise ResponseTooLarge(str(exc)) from None
            except EOFError as exc:
                raise PeerUnreachable(f"{method} on {peer_id[-8:]}: {exc}") from None
            finally:
                if done and len(self._idle[key]) < IDLE_STREAMS_PER_KEY:
                    self._idle[key].append((stream, reader))
                elif not done:
                    with trio.CancelScope(shield=True):
                        await stream.reset()
                else:
                    with trio.CancelScope(shield=True):
                        await stream.close()
            self._node.peers.saw(peer_id)
            if ok:
                return value
            code, text = value
            raise remote_error_for(code, text, peer=peer_id, method=method)
        raise AssertionError("unreachable")

    async def _open(self, peer_id: str, pid: str) -> tuple[Stream, wire.FrameReader]:
        stream = await self._node.open_stream(peer_id, pid)
        return stream, wire.FrameReader(stream)


__all__ = [
    "CallContext",
    "RemoteError",
    "RpcClient",
    "RpcServer",
    "Service",
    "decode_request",
    "decode_response",
    "protocol_id",
    "rpc",
]
