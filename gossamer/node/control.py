"""The daemon's local control API: how the CLI and scripts talk to a running node.

Protocol (deliberately boring, so any language can speak it with a socket):
newline-delimited JSON over TCP on 127.0.0.1 only.  Each request is one line

    {"token": "<hex>", "method": "node.status", "params": {...}, "id": <optional>}

and each answer is one line, ``{"ok": <result>}`` or
``{"error": {"type": "...", "message": "..."}}`` (``id`` echoed when given).
A connection may carry several requests in turn.

Who may call: whoever can read ``<data dir>/control.json`` (mode 0600, so the
user who runs the daemon).  It holds the port, a random 256-bit token, the
daemon's pid and peer id.  The token is compared in constant time; a wrong one
gets an ``unauthorized`` answer and the connection is closed.

Bounds: a request line is at most :data:`MAX_REQUEST_BYTES`; a connection
that does not finish a request within ``request_timeout`` is closed; at most
``max_connections`` connections are served at once; a handler gets
``handler_timeout`` seconds.  A handler that raises
:class:`~gossamer.node.errors.GossamerError` produces an error answer with its
message; anything else is logged and answered ``internal``.  No request can
stop the daemon.

The request/response encoding (:func:`decode_request`, :func:`validate_call`,
:func:`encode_ok`, :func:`encode_error`) is pure; :class:`ControlServer`
(trio) and :class:`ControlClient` (blocking sockets, for the synchronous CLI)
only move lines.  trio is imported inside the server's methods so that the
CLI's client commands, which import this module, do not pay for it.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gossamer.node.complaints import Complaints
from gossamer.node.errors import GossamerError

log = logging.getLogger(__name__)

CONTROL_FILE_NAME = "control.json"
CONTROL_HOST = "127.0.0.1"
PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 1 << 20
# Answers can be large (a peer table of thousands of peers) but not unbounded.
MAX_RESPONSE_BYTES = 64 << 20
_READ_CHUNK = 64 << 10

ControlHandler = Callable[[dict[str, Any]], Awaitable[Any]]


# --------------------------------------------------------------------- errors


class NoDaemon(GossamerError):
    """No daemon is running for this data directory (or it does not answer)."""


class ControlError(GossamerError):
    """The daemon answered a control request with an error.

    ``type`` is ``unauthorized``, ``bad_request``, ``too_large``,
    ``unknown_method``, ``deadline``, ``busy``, ``internal``, or the class name
    of the :class:`GossamerError` the handler raised (``PeerUnreachable``, ...).
    """

    def __init__(self, message: str, type: str = "internal") -> None:
        super().__init__(message)
        self.type = type
        self.message = message


class _Reject(Exception):
    """Internal: a request the server answers with an error."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(message)
        self.type = type
        self.message = message


# ------------------------------------------------------------- pure encoding


@dataclass(frozen=True)
class Request:
    method: str
    params: dict[str, Any]
    id: Any = None


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Parse one request line (without its newline): its token and the whole body.

    Only what authentication needs is checked here; the rest of the body is
    looked at (:func:`validate_call`) after the token matched, so an
    unauthenticated client learns nothing and keeps no connection open.
    Raises ``_Reject``.
    """
    try:
        body = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested input
        raise _Reject("bad_request", "request is not valid JSON") from None
    if not isinstance(body, dict):
        raise _Reject("bad_request", "request must be a JSON object")
    token = body.get("token")
    if not isinstance(token, str):
        raise _Reject("unauthorized", "request has no token")
    return token, body


def validate_call(body: dict[str, Any]) -> Request:
    """The method call in an authenticated request body; raises ``_Reject``."""
    method = body.get("method")
    if not isinstance(method, str) or not method:
        raise _Reject("bad_request", "request needs 'method', a string")
    params = body.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _Reject("bad_request", "'params' must be a JSON object")
    return Request(method=method, params=params, id=body.get("id"))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def encode_ok(result: Any, request_id: Any = None) -> bytes:
    """One response line for a result; TypeError when the result is not JSON-able."""
    body: dict[str, Any] = {"ok": result}
    if request_id is not None:
        body["id"] = request_id
    return json.dumps(body, default=_json_default, separators=(",", ":")).encode() + b"\n"


def encode_error(type: str, message: str, request_id: Any = None) -> bytes:
    body: dict[str, Any] = {"error": {"type": type, "message": message}}
    if request_id is not None:
        body["id"] = request_id
    return json.dumps(body, default=str, separators=(",", ":")).encode() + b"\n"


def tokens_match(given: str, expected: str) -> bool:
    """Constant-time comparison (no early exit that leaks the matching prefix length)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


# -------------------------------------------------------------- control file


def control_file_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / CONTROL_FILE_NAME


def write_control_file(data_dir: Path, info: Mapping[str, Any]) -> Path:
    """Write ``control.json`` atomically, readable only by its owner (0600).

    Created with mode 0600 from the first byte (a chmod after writing would
    leave a window in which the token is readable), then renamed into place
    so a reader never sees half a file.
    """
    path = control_file_path(data_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(dict(info), fh)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


def read_control_file(data_dir: Path | str) -> dict[str, Any]:
    """The live daemon's control info for ``data_dir``; :class:`NoDaemon` otherwise.

    A control file whose pid is gone (the daemon was killed) is reported as
    stale rather than trusted: connecting to its port could reach some other
    program that took the port since.
    """
    path = control_file_path(data_dir)
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoDaemon(f"no daemon running in {data_dir}") from None
    except PermissionError:
        raise NoDaemon(f"cannot read {path}: it belongs to another user") from None
    except (OSError, ValueError):
        raise NoDaemon(f"no daemon running in {data_dir} (unreadable {path.name})") from None
    if not isinstance(info, dict) or not all(
        isinstance(info.get(k), t) for k, t in (("port", int), ("token", str), ("pid", int))
    ):
        raise NoDaemon(f"no daemon running in {data_dir} (malformed {path.name})")
    if not _pid_alive(info["pid"]):
        raise NoDaemon(
            f"no daemon running in {data_dir} (stale {path.name} of pid {info['pid']}, "
            "which is gone)"
        )
    return info


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_control_file(data_dir: Path, token: str) -> None:
    """Remove ``control.json`` if it is still ours (same token)."""
    path = control_file_path(data_dir)
    try:
        if json.loads(path.read_text()).get("token") == token:
            path.unlink()
    except (OSError, ValueError, AttributeError):
        log.debug("control file %s already gone or not ours", path)


# --------------------------------------------------------------------- server


class ControlServer:
    """Serve ``methods`` on 127.0.0.1 with token authentication.

    It holds the method table by reference, so methods registered after it
    starts (``node.register_control``) are served too.
    """

    def __init__(
        self,
        methods: Mapping[str, ControlHandler],
        data_dir: Path,
        *,
        peer_id: str = "",
        port: int = 0,
        request_timeout: float = 30.0,
        handler_timeout: float = 300.0,
        max_connections: int = 32,
    ) -> None:
        self.methods = methods
        self.data_dir = Path(data_dir)
        self.peer_id = peer_id
        self.port = port
        self.token = secrets.token_hex(32)
        self.request_timeout = request_timeout
        self.handler_timeout = handler_timeout
        self.max_connections = max_connections
        self._active = 0
        self.control_file: Path | None = None
        # any local process can knock: wrong tokens are logged once a minute, with a count
        self._complaints = Complaints()

    async def run(self, *, task_status: Any = None) -> None:
        """Listen, write the control file, serve until cancelled, then remove it.

        Use with ``await nursery.start(server.run)``: it reports started once
        the port accepts connections and the control file exists.
        """
        import trio

        if task_status is None:
            task_status = trio.TASK_STATUS_IGNORED
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=CONTROL_HOST)
        except OSError as exc:
            raise GossamerError(
                f"cannot listen for the control API on {CONTROL_HOST}:{self.port}: "
                f"{exc.strerror or exc}"
            ) from None
        try:
            self.port = listeners[0].socket.getsockname()[1]
            self.control_file = write_control_file(
                self.data_dir,
                {
                    "version": PROTOCOL_VERSION,
                    "host": CONTROL_HOST,
                    "port": self.port,
                    "token": self.token,
                    "pid": os.getpid(),
                    "peer_id": self.peer_id,
                },
            )
            log.info("control API on %s:%d (%s)", CONTROL_HOST, self.port, self.control_file)
            task_status.started(self)
            await trio.serve_listeners(self._serve_connection, listeners)
        finally:
            remove_control_file(self.data_dir, self.token)
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def _serve_connection(self, stream: Any) -> None:
        """One client connection.  Never raises: a control request cannot kill the daemon."""
        import trio

        try:
            async with stream:
                if self._active >= self.max_connections:
                    await self._send(stream, encode_error("busy", "too many control connections"))
                    return
                self._active += 1
                try:
                    await self._serve_requests(stream)
                finally:
                    self._active -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            log.debug("control client went away or stopped reading")
        except Exception:
            log.warning("control connection failed", exc_info=True)

    async def _serve_requests(self, stream: Any) -> None:
        import trio

        buffer = bytearray()
        while True:
            with trio.move_on_after(self.request_timeout) as scope:
                try:
                    line = await _read_line(stream, buffer, MAX_REQUEST_BYTES)
                except _Reject as reject:
                    await self._send(stream, encode_error(reject.type, reject.message))
                    # Read (and drop) what the client is still sending, briefly:
                    # closing with unread input resets the connection, and the
                    # client would see "connection reset" instead of our answer.
                    await _drain(stream, MAX_REQUEST_BYTES * 4, timeout=1.0)
                    return
            if scope.cancelled_caught:
                log.debug("control connection idle for %.0f s: closing", self.request_timeout)
                return
            if line is None:
                return
            try:
                token, body = decode_request(line)
            except _Reject as reject:
                await self._send(stream, encode_error(reject.type, reject.message))
                return
            if not tokens_match(token, self.token):
                self._complaints.log(log, "token", "control request with a wrong token: refused")
                await self._send(
                    stream, encode_error("unauthorized", "wrong control token", body.get("id"))
                )
                return
            try:
                request = validate_call(body)
            except _Reject as reject:
                await self._send(stream, encode_error(reject.type, reject.message, body.get("id")))
                continue
            await self._send(stream, await self._dispatch(request))

    async def _dispatch(self, request: Request) -> bytes:
        """Run the handler and build the answer line (never raises except Cancelled)."""
        import trio

        handler = self.methods.get(request.method)
        if handler is None:
            known = ", ".join(sorted(self.methods))
            return encode_error(
                "unknown_method",
                f"unknown control method {request.method!r} (known: {known})",
                request.id,
            )
        log.debug("control %s", request.method)
        try:
            with trio.move_on_after(self.handler_timeout) as scope:
                result = await handler(request.params)
            if scope.cancelled_caught:
                return encode_error(
                    "deadline",
                    f"{request.method} did not finish within {self.handler_timeout:g} s",
                    request.id,
                )
            return encode_ok(result, request.id)
        except GossamerError as exc:
            log.info("control %s: %s", request.method, exc)
            return encode_error(type(exc).__name__, str(exc) or type(exc).__name__, request.id)
        except Exception as exc:
            log.error("control method %s failed", request.method, exc_info=True)
            return encode_error(
                "internal",
                f"{request.method} failed: {type(exc).__name__}: {exc}",
                request.id,
            )

    async def _send(self, stream: Any, line: bytes) -> None:
        """Send one answer; a client that does not read it in time is dropped."""
        import trio

        with trio.fail_after(self.request_timeout):
            await stream.send_all(line)


async def _read_line(stream: Any, buffer: bytearray, limit: int) -> bytes | None:
    """The next line from ``stream`` (``buffer`` keeps what follows); None at a clean EOF."""
    scanned = 0
    while True:
        index = buffer.find(b"\n", scanned)
        if index >= 0:
            if index > limit:
                raise _Reject("too_large", f"request exceeds {limit} bytes")
            line = bytes(buffer[:index])
            del buffer[: index + 1]
            return line
        if len(buffer) > limit:
            raise _Reject("too_large", f"request exceeds {limit} bytes")
        scanned = len(buffer)
        chunk = await stream.receive_some(_READ_CHUNK)
        if not chunk:
            if buffer.strip():
                raise _Reject("bad_request", "connection closed in the middle of a request")
            return None
        buffer += chunk


async def _drain(stream: Any, limit: int, *, timeout: float) -> None:
    import trio

    received = 0
    with trio.move_on_after(timeout):
        while received <= limit:
            chunk = await stream.receive_some(_READ_CHUNK)
            if not chunk:
                return
            received += len(chunk)


# --------------------------------------------------------------------- client


class ControlClient:
    """A blocking client for the control API of the daemon serving ``data_dir``.

    Blocking on purpose: the CLI is synchronous and a call is one round trip
    on loopback.  One connection is opened lazily and reused; use as a
    context manager or call :meth:`close`.
    """

    def __init__(self, data_dir: Path | str, *, timeout: float = 30.0) -> None:
        self.data_dir = Path(data_dir)
        self.info = read_control_file(self.data_dir)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    @property
    def peer_id(self) -> str:
        return str(self.info.get("peer_id", ""))

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer.clear()

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = socket.create_connection(
                    (CONTROL_HOST, self.info["port"]), timeout=min(self.timeout, 5.0)
                )
            except OSError as exc:
                raise NoDaemon(
                    f"no daemon answering in {self.data_dir} (pid {self.info['pid']}, "
                    f"port {self.info['port']}: {exc.strerror or exc})"
                ) from None
        return self._sock

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Call ``method`` on the daemon; the result, or :class:`ControlError`."""
        request = {"token": self.info["token"], "method": method, "params": dict(params or {})}
        line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_REQUEST_BYTES:
            raise ControlError(f"request exceeds {MAX_REQUEST_BYTES} bytes", "too_large")
        sock = self._connect()
        sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            sock.sendall(line)
            answer = self._read_line(sock)
        except TimeoutError:
            self.close()
            raise ControlError(f"the daemon did not answer {method} in time", "deadline") from None
        except OSError as exc:
            self.close()
            raise NoDaemon(f"lost the connection to the daemon in {self.data_dir}: {exc}") from None
        try:
            body = json.loads(answer)
        except ValueError:
            self.close()
            raise ControlError(
                "the daemon sent an answer that is not JSON", "bad_response"
            ) from None
        if isinstance(body, dict) and "ok" in body:
            return body["ok"]
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            self.close()
            raise ControlError("the daemon sent a malformed answer", "bad_response")
        if error.get("type") in ("unauthorized", "bad_request", "too_large", "busy"):
            self.close()  # the server closes after these
        raise ControlError(str(error.get("message", "")), str(error.get("type", "internal")))

    def _read_line(self, sock: socket.socket) -> bytes:
        scanned = 0
        while True:
            index = self._buffer.find(b"\n", scanned)
            if index >= 0:
                line = bytes(self._buffer[:index])
                del self._buffer[: index + 1]
                return line
            if len(self._buffer) > MAX_RESPONSE_BYTES:
                self.close()
                raise ControlError(f"answer exceeds {MAX_RESPONSE_BYTES} bytes", "too_large")
            scanned = len(self._buffer)
            chunk = sock.recv(_READ_CHUNK)
            if not chunk:
                raise ConnectionResetError("the daemon closed the connection")
            self._buffer += chunk


def call(
    data_dir: Path | str,
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    timeout: float = 30.0,
) -> Any:
    """One-shot :meth:`ControlClient.call` (opens and closes a connection)."""
    with ControlClient(data_dir, timeout=timeout) as client:
        return client.call(method, params)
