"""Which asyncio event loop a server process runs on.

uvloop (libuv under asyncio's interface) took 6-14% off the server's CPU per Register in A/B
runs on this project's 2-core machines (docs/capacity.md): much of a call's cost is event-loop
work around gRPC's callbacks, and uvloop does that work in C. gRPC's asyncio API
works on any asyncio loop. "auto", the default, uses uvloop where it is installed (it is a
dependency on Linux and macOS) and the standard loop elsewhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from discovery.errors import InvalidArgument

T = TypeVar("T")
CHOICES = ("auto", "asyncio", "uvloop")


def resolve(choice: str) -> str:
    """The loop ``choice`` means here: "asyncio" or "uvloop" (InvalidArgument when uvloop is
    asked for and missing, or the choice is unknown)."""
    if choice not in CHOICES:
        raise InvalidArgument("event_loop", f"{choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return choice
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise InvalidArgument(
                "event_loop", "uvloop is not installed (pip install uvloop), or choose asyncio"
            ) from None
        return "asyncio"
    return "uvloop"


def run(main: Callable[[], Coroutine[Any, Any, T]], choice: str) -> T:
    """``asyncio.run(main())`` on the loop ``choice`` resolves to (the coroutine is made only
    once the choice is known to work)."""
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())
