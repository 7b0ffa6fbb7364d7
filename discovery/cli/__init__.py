"""The ``discovery`` command: one module per command group, one function per verb.

Public entry point: ``main`` (the console script)."""

from discovery.cli.main import main

__all__ = ["main"]
