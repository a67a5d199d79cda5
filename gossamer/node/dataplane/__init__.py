"""Tensor data plane: encrypted, identity-bound bulk transfer of named buffers."""

from gossamer.node.dataplane.channel import SendReport
from gossamer.node.dataplane.mailbox import PendingReceive, Received
from gossamer.node.dataplane.plane import PROTOCOL, DataPlane

__all__ = ["PROTOCOL", "DataPlane", "PendingReceive", "Received", "SendReport"]
