"""Command line interface: ``gossamer …``."""
