"""How layers above the node attach to it: typed services and the interfaces
the node's own behaviours need from them.

The node knows nothing about the DHT, the run documents or training.  A layer
above attaches its service object with :meth:`Services.attach`; anyone holding
the node finds it again with ``node.service(DHT)`` (or, for an interface
defined down here, ``node.service(ContentRouting)``) and gets ``None`` when
nothing of that kind is attached.  No attribute is ever set on the node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from gossamer.node.errors import GossamerError

T = TypeVar("T")


@dataclass(frozen=True)
class Provider:
    """A peer that announced a content id, with the addresses it announced."""

    peer_id: str
    addrs: tuple[str, ...]
    expires_at: float


@runtime_checkable
class ContentRouting(Protocol):
    """Announce and find content by id; the DHT implements it.

    Relays announce themselves through it and find each other with it; the
    node's behaviours use nothing else of the DHT.
    """

    async def provide(
        self, content_id: str, ttl: float | None = None, *, timeout: float | None = None
    ) -> int: ...

    async def find_providers(
        self, content_id: str, *, timeout: float | None = None
    ) -> Sequence[Provider]: ...


class Services:
    """The services attached to one node, one per type."""

    def __init__(self) -> None:
        self._attached: list[object] = []

    def attach(self, service: object) -> None:
        """Attach ``service``; a second service of the same type is refused."""
        kind = type(service)
        if any(type(s) is kind for s in self._attached):
            raise GossamerError(f"a {kind.__name__} is already attached to this node")
        self._attached.append(service)

    def detach(self, service: object) -> None:
        """Remove ``service`` (when it stops); unknown services are ignored."""
        self._attached = [s for s in self._attached if s is not service]

    def get(self, kind: type[T]) -> T | None:
        """The attached service that is a ``kind`` (a class or a runtime-checkable
        protocol), or None."""
        for service in self._attached:
            if isinstance(service, kind):
                return service
        return None
