"""CRDT layer: the replicated, signed run document."""
