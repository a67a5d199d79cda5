"""Serving experts to the network: the ``ddm`` RPC service, both sides of its protocol.

A node that serves experts registers :class:`DdmService` (``/gossamer/ddm/1.0.0``) holding one or
more checkpoints, each named by its content id: the hex sha256 of its safetensors bytes (the
same bytes that sit on disk and that ``expert_from_bytes`` reads). Methods:

* ``describe()`` → what this node serves: per checkpoint ``cid``, ``kind`` (``expert`` /
  ``router``), ``cluster``, ``run``, ``spec``, ``image_shape``, ``nbytes``, ``cond_dim``, and the
  server's limits (``max_batch``, ``inline_max_bytes``).
* ``fetch(cid, offset, length)`` → a chunk (≤ 1 MiB) of a checkpoint's bytes: samplers download
  the weights once per content id to verify the announcement (see ``verify.py``).
* ``denoise(cid, shape, dtype, t, x=…, cond=…, tag=…)`` → velocities for a batch. ``shape`` is
  (B, C, H, W), ``dtype`` must be ``"float32"``, ``t`` is B little-endian float32 in [0, 1].
  Small batches travel *inline*: ``x`` holds the B·C·H·W float32 bytes and the answer is
  ``{"v": bytes}``. A batch above ``inline_max_bytes`` travels on the encrypted tensor data plane
  instead: the client sends ``{"x"}`` under ``tag`` (``t`` stays inline), calls ``denoise``
  with that ``tag``, and the server answers on ``tag + "/v"`` (and returns ``{"tag": …}``), so
  large batches get the data plane's zero-copy path rather than being packed into msgpack.
* ``integrate(cid, shape, dtype, start, end, steps, x=…, tag=…)`` → the rows carried from Euler
  step ``start`` to ``end`` (dt = 1/steps) by this expert alone: sticky sampling's whole
  remaining trajectory in one request instead of one round trip per step.

Every incoming tensor is validated before a byte of it reaches a model (:func:`check_batch`):
known content id of kind ``expert``, dtype, rank-4 shape equal to the expert's image shape,
1 ≤ B ≤ ``max_batch``, exact byte counts, finite values, t within [0, 1], conditioning only for
experts that take it. A refusal is a typed ``Refused`` (code ``bad_tensor``, ``unknown_cid``,
``too_large``); the node logs it once per peer and keeps serving. Model forwards run in a worker
thread, one at a time (``CapacityLimiter(1)``: several samplers queue instead of oversubscribing
the cores), never on the event loop.

Conditioning: an expert whose ``forward`` takes a third argument ``cond`` receives a float32
(B, cond_dim) tensor; the built-in experts are unconditional and refuse one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import trio

from gossamer.node import (
    CallContext,
    Complaints,
    DeadlineExceeded,
    GossamerError,
    InFlight,
    PeerBudget,
    Refused,
    Service,
    TransferError,
)
from gossamer.node.rpc import rpc
from gossamer.training.diffusion.models import (
    ExpertSpec,
    expert_from_bytes,
    safetensors_metadata,
)

if TYPE_CHECKING:
    from gossamer.node import Node

log = logging.getLogger(__name__)

SERVICE_NAME = "ddm"
WIRE_DTYPE = "float32"
DEFAULT_MAX_BATCH = 4096
INLINE_MAX_BYTES = 1 << 20  # larger batches go over the tensor data plane
FETCH_CHUNK_BYTES = 1 << 20
_HEADER_ALLOWANCE = 16 << 10  # msgpack header + small fields around the raw bytes
MAX_CHECKPOINT_BYTES = 4 << 30
_ITEM = 4  # float32
MAX_STEPS = 100_000
MAX_ROW_STEPS = 2_000_000  # one integrate request: rows × steps (= one peer's burst)
# What one peer may ask of this host: row-steps (one expert forward of one image) in a burst
# and then per second, and jobs at once.  The compute threads are shared by every peer; these
# keep one of them from holding them all (a legitimate sampler asks ~100 × its batch per run).
PEER_ROW_STEPS_BURST = MAX_ROW_STEPS
PEER_ROW_STEPS_PER_S = 20_000
PEER_JOBS = 16  # a sampler has one request per expert (and micro-batch) in flight
DDM_META_KEY = "gossamer_ddm"  # checkpoint metadata: {"cluster", "run", "partition", "steps"}


def content_id(data: bytes | bytearray | memoryview) -> str:
    """The content address of a checkpoint: hex sha256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def checkpoint_meta(data: bytes) -> dict[str, Any]:
    """The ``gossamer_ddm`` metadata of a checkpoint (cluster, run, ...), or {} if it has none."""
    try:
        raw = safetensors_metadata(data).get(DDM_META_KEY)
        meta = json.loads(raw) if raw else {}
    except (ValueError, TypeError):
        return {}
    return meta if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------- tensors on the wire


def to_wire(tensor: torch.Tensor) -> memoryview:
    """A float32 tensor's bytes, zero-copy (msgpack packs a memoryview as bin)."""
    flat = tensor.detach().to(torch.float32).contiguous().reshape(-1)
    return memoryview(flat.numpy()).cast("B")


def from_wire(raw: bytes | bytearray | memoryview, shape: Sequence[int]) -> torch.Tensor:
    """A float32 tensor of ``shape`` from exactly that many bytes (copied: a peer's buffer)."""
    arr = np.frombuffer(raw, dtype="<f4")
    return torch.from_numpy(arr.reshape(tuple(shape)).copy())


def _bad(message: str, code: str = "bad_tensor") -> Refused:
    return Refused(message, code)


def check_shape(
    shape: Any, image_shape: tuple[int, int, int], max_batch: int
) -> tuple[int, int, int, int]:
    """Validate a requested (B, C, H, W): four ints, the expert's image shape, batch in bounds."""
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    ):
        raise _bad("shape must be a list of 4 integers (B, C, H, W)")
    b, c, h, w = shape
    if (c, h, w) != tuple(image_shape):
        raise _bad(f"image shape {[c, h, w]} does not match the expert's {list(image_shape)}")
    if not 1 <= b <= max_batch:
        raise _bad(
            f"batch of {b} rows is outside 1..{max_batch}", "too_large" if b > 0 else "bad_tensor"
        )
    return b, c, h, w


def check_batch(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, cond_dim: int) -> None:
    """Refuse non-finite inputs, t outside [0, 1] and conditioning the expert does not take."""
    if not bool(torch.isfinite(x).all()):
        raise _bad("x_t holds NaN or infinite values")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
        raise _bad("t must be finite and within [0, 1]")
    if cond is None:
        if cond_dim:
            raise _bad(f"this expert needs conditioning of width {cond_dim}")
        return
    if not cond_dim:
        raise _bad("this expert is unconditional: send no conditioning")
    if cond.shape != (x.shape[0], cond_dim) or not bool(torch.isfinite(cond).all()):
        raise _bad(f"conditioning must be finite float32 ({x.shape[0]}, {cond_dim})")


def _expect_bytes(value: Any, nbytes: int, what: str) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise _bad(f"{what} must be raw bytes")
    if len(value) != nbytes:
        raise _bad(f"{what} has {len(value)} bytes, expected {nbytes} ({WIRE_DTYPE})")
    return value


# ------------------------------------------------------------------------------ the server side


@dataclass
class ServedCheckpoint:
    """One checkpoint this node serves (the bytes are kept: peers fetch them to verify)."""

    cid: str
    data: bytes
    kind: str  # "expert" | "router"
    model: torch.nn.Module | None = None
    spec: ExpertSpec | None = None
    image_shape: tuple[int, int, int] = (0, 0, 0)
    cluster: int | None = None
    run_id: str | None = None
    cond_dim: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "cid": self.cid,
            "kind": self.kind,
            "cluster": self.cluster,
            "run": self.run_id,
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "image_shape": list(self.image_shape),
            "nbytes": len(self.data),
            "cond_dim": self.cond_dim,
        }


def _cond_dim(model: torch.nn.Module) -> int:
    """Conditioning width: the model's ``cond_dim`` if its forward takes ``cond``, else 0."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return 0
    if "cond" not in params:
        return 0
    return int(getattr(model, "cond_dim", 0) or 0)


class ExpertServer:
    """The checkpoints a node serves and the one worker thread that runs their forwards."""

    def __init__(
        self,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        num_threads: int | None = 1,
        admits: Callable[[str, str], bool] | None = None,
    ):
        self.max_batch = max_batch
        # admits(run_id, peer_id): may this peer use the checkpoints of that run? (None: all.)
        # A run's experts are served as its charter says (serve_checkpoints wires it).
        self.admits = admits
        self.checkpoints: dict[str, ServedCheckpoint] = {}
        self._limiter = trio.CapacityLimiter(1)
        self._num_threads = num_threads
        self.requests = 0
        self.rows = 0
        self.refusals = 0
        # one log line per peer per minute, with a count (a set per peer and reason grew
        # with every peer id a stranger made up)
        self._complaints = Complaints()

    def add_expert(
        self,
        data: bytes,
        *,
        cluster: int | None = None,
        run_id: str | None = None,
        model: torch.nn.Module | None = None,
    ) -> ServedCheckpoint:
        """Serve the expert checkpoint ``data`` (``expert_to_bytes`` output); returns its entry.

        ``cluster`` and ``run_id`` default to the checkpoint's ``gossamer_ddm`` metadata.
        ``model`` lets tests serve weights that differ from ``data`` (a lying server).
        """
        if len(data) > MAX_CHECKPOINT_BYTES:
            raise ValueError("checkpoint too large")
        built, spec, shape = expert_from_bytes(data)
        meta = checkpoint_meta(data)
        if cluster is None and isinstance(meta.get("cluster"), int):
            cluster = meta["cluster"]
        if run_id is None and isinstance(meta.get("run"), str):
            run_id = meta["run"]
        model = (model or built).eval()
        entry = ServedCheckpoint(
            cid=content_id(data),
            data=bytes(data),
            kind="expert",
            model=model,
            spec=spec,
            image_shape=shape,
            cluster=cluster,
            run_id=run_id,
            cond_dim=_cond_dim(model),
            meta=meta,
        )
        self.checkpoints[entry.cid] = entry
        return entry

    def add_blob(self, data: bytes, kind: str = "router", run_id: str | None = None):
        """Serve bytes for ``fetch`` only (a router's weights): no ``denoise`` on them."""
        entry = ServedCheckpoint(content_id(data), bytes(data), kind, run_id=run_id)
        self.checkpoints[entry.cid] = entry
        return entry

    def remove(self, cid: str) -> None:
        self.checkpoints.pop(cid, None)

    def expert(self, cid: Any, peer_id: str) -> ServedCheckpoint:
        entry = self.checkpoints.get(cid) if isinstance(cid, str) else None
        if entry is None or entry.kind != "expert":
            raise Refused(f"this node serves no expert {str(cid)[:16]}", "unknown_cid")
        self.check_admitted(entry, peer_id)
        return entry

    def may_use(self, entry: ServedCheckpoint, peer_id: str) -> bool:
        return entry.run_id is None or self.admits is None or self.admits(entry.run_id, peer_id)

    def check_admitted(self, entry: ServedCheckpoint, peer_id: str) -> None:
        if not self.may_use(entry, peer_id):
            raise Refused(f"you are not admitted to run {entry.run_id}", "not_admitted")

    async def forward(
        self, entry: ServedCheckpoint, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
    ) -> torch.Tensor:
        """The expert's velocity for a validated batch, computed in the worker thread."""
        assert entry.model is not None
        model, num_threads = entry.model, self._num_threads

        def run() -> torch.Tensor:
            if num_threads is not None and torch.get_num_threads() != num_threads:
                torch.set_num_threads(num_threads)
            with torch.no_grad():
                out = model(x, t) if cond is None else model(x, t, cond)
            return out.to(torch.float32).contiguous()

        async with self._limiter:
            v = await trio.to_thread.run_sync(run)
        if v.shape != x.shape:
            raise Refused(f"the expert produced {tuple(v.shape)} for {tuple(x.shape)}", "internal")
        self.requests += 1
        self.rows += int(x.shape[0])
        return v

    async def integrate(
        self,
        entry: ServedCheckpoint,
        x: torch.Tensor,
        start: int,
        end: int,
        steps: int,
        cond: torch.Tensor | None,
    ) -> torch.Tensor:
        """Euler steps ``start..end-1`` of dt = 1/steps from a validated batch, in the worker."""
        assert entry.model is not None
        model, num_threads = entry.model, self._num_threads

        def run() -> torch.Tensor:
            if num_threads is not None and torch.get_num_threads() != num_threads:
                torch.set_num_threads(num_threads)
            dt = 1.0 / steps
            y = x
            with torch.no_grad():
                for i in range(start, end):
                    t = torch.full((y.shape[0],), i * dt)
                    v = model(y, t) if cond is None else model(y, t, cond)
                    y = y + dt * v.to(torch.float32)
            return y.contiguous()

        async with self._limiter:
            out = await trio.to_thread.run_sync(run)
        self.requests += 1
        self.rows += int(x.shape[0]) * (end - start)
        return out

    def note_refusal(self, peer_id: str, exc: Refused) -> None:
        self.refusals += 1
        self._complaints.log(
            log, peer_id, "ddm: refused a request from %s: %s", peer_id[-8:], exc.message
        )


class DdmService(Service):
    """``/gossamer/ddm/1.0.0``: describe, fetch and denoise (see the module docstring)."""

    name: ClassVar[str] = SERVICE_NAME
    version: ClassVar[str] = "1.0.0"
    # the largest inline batch plus its header; larger ones use the data plane
    max_request_bytes: ClassVar[int | None] = INLINE_MAX_BYTES + _HEADER_ALLOWANCE
    max_response_bytes: ClassVar[int | None] = max(INLINE_MAX_BYTES, FETCH_CHUNK_BYTES) + (
        _HEADER_ALLOWANCE
    )

    def __init__(self, node: Node, server: ExpertServer) -> None:
        self.node = node
        self.server = server
        self._work = PeerBudget(PEER_ROW_STEPS_BURST, PEER_ROW_STEPS_PER_S)
        self._jobs = InFlight(PEER_JOBS)

    def _admit(self, peer_id: str, row_steps: int) -> None:
        """Start one job of ``row_steps`` for ``peer_id`` or refuse it (busy, over budget);
        the caller ends the job (``self._jobs.end``) whatever happens next."""
        if not self._jobs.start(peer_id):
            raise Refused(f"{PEER_JOBS} requests of yours are running already", "busy")
        if not self._work.take(peer_id, row_steps):
            self._jobs.end(peer_id)
            raise Refused(
                f"{row_steps} row-steps exceed what you have left "
                f"({int(self._work.left(peer_id))}; {self._work.rate:g}/s)",
                "over_budget",
            )

    @rpc
    async def describe(self, ctx: CallContext) -> dict[str, Any]:
        return {
            "checkpoints": [
                c.describe()
                for c in self.server.checkpoints.values()
                if self.server.may_use(c, ctx.peer_id)
            ],
            "max_batch": self.server.max_batch,
            "inline_max_bytes": INLINE_MAX_BYTES,
        }

    @rpc
    async def fetch(self, ctx: CallContext, cid: str, offset: int, length: int) -> bytes:
        entry = self.server.checkpoints.get(cid)
        if entry is None:
            raise Refused(f"this node serves no checkpoint {cid[:16]}", "unknown_cid")
        try:
            self.server.check_admitted(entry, ctx.peer_id)
        except Refused as exc:
            self.server.note_refusal(ctx.peer_id, exc)
            raise
        if offset < 0 or length < 1 or offset > len(entry.data):
            raise Refused("offset/length out of range", "bad_request")
        return entry.data[offset : offset + min(length, FETCH_CHUNK_BYTES)]

    @rpc
    async def denoise(
        self,
        ctx: CallContext,
        cid: str,
        shape: list,
        dtype: str,
        t: bytes,
        x: bytes | None = None,
        cond: bytes | None = None,
        tag: str | None = None,
    ) -> dict[str, Any]:
        """Velocities v(x_t, t) of one batch."""
        try:
            entry = self.server.expert(cid, ctx.peer_id)
            b = self._check_header(entry, shape, dtype)
            self._admit(ctx.peer_id, b)
        except Refused as exc:
            self._refused(ctx, exc, tag)
            raise
        try:
            try:
                t_tensor = from_wire(_expect_bytes(t, b * _ITEM, "t"), (b,))
                x_tensor, cond_tensor = await self._read_batch(ctx, entry, shape, x, cond, tag)
                check_batch(x_tensor, t_tensor, cond_tensor, entry.cond_dim)
            except Refused as exc:
                self._refused(ctx, exc, tag)
                raise
            v = await self.server.forward(entry, x_tensor, t_tensor, cond_tensor)
            return await self._reply(ctx, tag, v)
        finally:
            self._jobs.end(ctx.peer_id)

    @rpc
    async def integrate(
        self,
        ctx: CallContext,
        cid: str,
        shape: list,
        dtype: str,
        start: int,
        end: int,
        steps: int,
        x: bytes | None = None,
        cond: bytes | None = None,
        tag: str | None = None,
    ) -> dict[str, Any]:
        """Euler steps ``start..end-1`` of ``steps`` (dt = 1/steps) with this expert alone.

        For sticky sampling: once a row keeps one expert to the end, its whole remaining
        trajectory is one request instead of one per step. Same arithmetic as the sampler's
        (t = i·dt, x ← x + dt·v), so the result is the one per-step requests would give.
        """
        try:
            entry = self.server.expert(cid, ctx.peer_id)
            b = self._check_header(entry, shape, dtype)
            if not (1 <= steps <= MAX_STEPS and 0 <= start < end <= steps):
                raise _bad(f"need 0 <= start < end <= steps <= {MAX_STEPS}")
            if (end - start) * b > MAX_ROW_STEPS:
                raise _bad(f"{(end - start) * b} row-steps exceed {MAX_ROW_STEPS}", "too_large")
            self._admit(ctx.peer_id, (end - start) * b)
        except Refused as exc:
            self._refused(ctx, exc, tag)
            raise
        try:
            try:
                x_tensor, cond_tensor = await self._read_batch(ctx, entry, shape, x, cond, tag)
                check_batch(x_tensor, torch.zeros(b), cond_tensor, entry.cond_dim)
            except Refused as exc:
                self._refused(ctx, exc, tag)
                raise
            out = await self.server.integrate(entry, x_tensor, start, end, steps, cond_tensor)
            return await self._reply(ctx, tag, out)
        finally:
            self._jobs.end(ctx.peer_id)

    def _check_header(self, entry: ServedCheckpoint, shape: Any, dtype: Any) -> int:
        if dtype != WIRE_DTYPE:
            raise _bad(f"dtype must be {WIRE_DTYPE!r}, got {str(dtype)[:16]!r}")
        return check_shape(shape, entry.image_shape, self.server.max_batch)[0]

    async def _read_batch(
        self,
        ctx: CallContext,
        entry: ServedCheckpoint,
        shape: list,
        x: Any,
        cond: Any,
        tag: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, c, h, w = (int(d) for d in shape)
        cond_tensor = None
        if cond is not None:
            if not entry.cond_dim:
                raise _bad("this expert is unconditional: send no conditioning")
            raw = _expect_bytes(cond, b * entry.cond_dim * _ITEM, "cond")
            cond_tensor = from_wire(raw, (b, entry.cond_dim))
        if tag is None:
            x_tensor = from_wire(_expect_bytes(x, b * c * h * w * _ITEM, "x"), (b, c, h, w))
        else:
            x_tensor = await self._receive_x(ctx, tag, (b, c, h, w), x)
        return x_tensor, cond_tensor

    def _refused(self, ctx: CallContext, exc: Refused, tag: Any) -> None:
        self.server.note_refusal(ctx.peer_id, exc)
        if isinstance(tag, str) and tag.startswith("ddm/"):
            self.node.dataplane.drop(tag)  # a batch already sent must not sit in memory

    async def _reply(self, ctx: CallContext, tag: str | None, out: torch.Tensor) -> dict[str, Any]:
        if tag is None:
            return {"v": to_wire(out)}
        with trio.move_on_after(max(0.0, ctx.deadline - trio.current_time())):
            await self.node.dataplane.send(ctx.peer_id, f"{tag}/v", {"v": out})
            return {"tag": f"{tag}/v"}
        raise Refused("could not send the answer before the deadline", "deadline")

    async def _receive_x(
        self, ctx: CallContext, tag: Any, shape: tuple[int, int, int, int], x: Any
    ) -> torch.Tensor:
        """The batch the client sent on the data plane under ``tag`` (preallocated: the data
        plane refuses a buffer whose dtype or shape differs from what we expect)."""
        if x is not None:
            raise _bad("send x inline or on the data plane, not both")
        if not isinstance(tag, str) or not tag.startswith("ddm/") or len(tag) > 64:
            raise _bad("a data-plane tag looks like ddm/<hex>")
        if math.prod(shape) * _ITEM <= 0:
            raise _bad("empty batch")
        x_tensor = torch.empty(shape, dtype=torch.float32)
        # leave the caller time to hear the refusal before its own deadline
        remaining = 0.8 * max(0.0, ctx.deadline - trio.current_time())
        try:
            await self.node.dataplane.recv(
                ctx.peer_id, tag, into={"x": x_tensor}, timeout=remaining
            )
        except (DeadlineExceeded, TransferError) as exc:
            raise _bad(f"data-plane batch {tag!r}: {exc}") from None
        return x_tensor


def serve(node: Node, server: ExpertServer | None = None, **kwargs: Any) -> ExpertServer:
    """Register the ``ddm`` service on a running node; returns its :class:`ExpertServer`."""
    server = server or ExpertServer(**kwargs)
    node.register(DdmService(node, server))
    return server


# ------------------------------------------------------------------------------ the client side


async def describe(node: Node, peer_id: str, *, timeout: float) -> dict[str, Any]:
    """A peer's ``describe`` answer, shape-checked (ProtocolError-free: bad answers raise
    ``ValueError``)."""
    answer = await node.call(peer_id, DdmService, "describe", {}, timeout=timeout)
    if not isinstance(answer, dict) or not isinstance(answer.get("checkpoints"), list):
        raise ValueError("malformed describe answer")
    return answer


async def fetch_checkpoint(
    node: Node, peer_id: str, cid: str, nbytes: int, *, timeout: float
) -> bytes:
    """Download checkpoint ``cid`` (``nbytes`` long, as the peer described it) in chunks.

    ``timeout`` bounds the whole download. The caller checks the hash: this only moves bytes.
    """
    if not 0 < nbytes <= MAX_CHECKPOINT_BYTES:
        raise ValueError(f"checkpoint size {nbytes} out of bounds")
    out = bytearray()
    with trio.fail_after(timeout):
        while len(out) < nbytes:
            chunk = await node.call(
                peer_id,
                DdmService,
                "fetch",
                {"cid": cid, "offset": len(out), "length": FETCH_CHUNK_BYTES},
                timeout=timeout,
            )
            if not isinstance(chunk, bytes) or not chunk or len(out) + len(chunk) > nbytes:
                raise ValueError("malformed checkpoint chunk")
            out += chunk
    return bytes(out)


async def remote_velocity(
    node: Node,
    peer_id: str,
    cid: str,
    x: torch.Tensor,
    t: torch.Tensor,
    *,
    timeout: float,
    cond: torch.Tensor | None = None,
    inline_max_bytes: int = INLINE_MAX_BYTES,
) -> torch.Tensor:
    """One ``denoise`` call: the velocities (B, C, H, W) of ``peer_id``'s expert ``cid``.

    Inline below ``inline_max_bytes`` of x, on the data plane above. The answer is checked
    (size, finite) before it is returned; a malformed one raises ``ValueError``. Network
    failures surface as the node's typed errors (``PeerUnreachable``, ``DeadlineExceeded``,
    ``RemoteError``).
    """
    t = t.detach().to(torch.float32).contiguous()
    params: dict[str, Any] = {"t": to_wire(t)}
    return await _batch_call(
        node, peer_id, "denoise", cid, x, params, cond, timeout, inline_max_bytes
    )


async def remote_integrate(
    node: Node,
    peer_id: str,
    cid: str,
    x: torch.Tensor,
    start: int,
    end: int,
    steps: int,
    *,
    timeout: float,
    cond: torch.Tensor | None = None,
    inline_max_bytes: int = INLINE_MAX_BYTES,
) -> torch.Tensor:
    """One ``integrate`` call: ``x`` carried from step ``start`` to ``end`` by this expert."""
    params: dict[str, Any] = {"start": int(start), "end": int(end), "steps": int(steps)}
    return await _batch_call(
        node, peer_id, "integrate", cid, x, params, cond, timeout, inline_max_bytes
    )


async def _batch_call(
    node: Node,
    peer_id: str,
    method: str,
    cid: str,
    x: torch.Tensor,
    params: dict[str, Any],
    cond: torch.Tensor | None,
    timeout: float,
    inline_max_bytes: int,
) -> torch.Tensor:
    x = x.detach().to(torch.float32).contiguous()
    params = {**params, "cid": cid, "shape": [int(d) for d in x.shape], "dtype": WIRE_DTYPE}
    if cond is not None:
        params["cond"] = to_wire(cond)
    nbytes = x.numel() * _ITEM
    if nbytes <= inline_max_bytes:
        params["x"] = to_wire(x)
        answer = await node.call(peer_id, DdmService, method, params, timeout=timeout)
        raw = answer.get("v") if isinstance(answer, dict) else None
        if not isinstance(raw, bytes) or len(raw) != nbytes:
            raise ValueError(f"malformed {method} answer")
        out = from_wire(raw, x.shape)
    else:
        out = await _batch_call_dataplane(node, peer_id, method, x, params, timeout)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"expert {cid[:12]} on {peer_id[-8:]} answered non-finite values")
    return out


async def _batch_call_dataplane(
    node: Node, peer_id: str, method: str, x: torch.Tensor, params: dict[str, Any], timeout: float
) -> torch.Tensor:
    """x over the data plane under a fresh tag, the answer back on ``tag/v`` (zero-copy into a
    preallocated tensor: the data plane refuses an answer of another shape or dtype)."""
    tag = f"ddm/{os.urandom(12).hex()}"
    params = {**params, "tag": tag}
    out = torch.empty_like(x)
    pending = node.dataplane.post_recv(peer_id, f"{tag}/v", into={"v": out})
    failure: BaseException | None = None
    try:
        with trio.move_on_after(timeout) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_quietly, node, peer_id, tag, x)
                try:
                    answer = await node.call(peer_id, DdmService, method, params, timeout=timeout)
                    if not isinstance(answer, dict) or answer.get("tag") != f"{tag}/v":
                        raise ValueError(f"malformed {method} answer")
                    await pending.wait(timeout)
                except (GossamerError, ValueError) as exc:
                    failure = exc  # raised below, outside the nursery (no exception group)
                    nursery.cancel_scope.cancel()
        if scope.cancelled_caught and failure is None:
            failure = DeadlineExceeded(f"{method} on {peer_id[-8:]} took longer than {timeout} s")
    finally:
        pending.cancel()
        node.dataplane.drop(tag)
    if failure is not None:
        raise failure
    return out


async def _send_quietly(node: Node, peer_id: str, tag: str, x: torch.Tensor) -> None:
    # A failed send shows up as the server's refusal (it never gets the batch) or as our
    # deadline: the call's error is the one worth reporting.
    try:
        await node.dataplane.send(peer_id, tag, {"x": x})
    except GossamerError as exc:
        log.debug("data-plane batch to %s failed: %s", peer_id[-8:], exc)


__all__ = [
    "DDM_META_KEY",
    "INLINE_MAX_BYTES",
    "DdmService",
    "ExpertServer",
    "ServedCheckpoint",
    "check_batch",
    "check_shape",
    "checkpoint_meta",
    "content_id",
    "describe",
    "fetch_checkpoint",
    "from_wire",
    "remote_integrate",
    "remote_velocity",
    "serve",
    "to_wire",
]
