"""The benches' (bench/) common ending: run, print the figures as JSON, optionally write them
to a file, and stop every process started on SIGTERM as on Ctrl-C (exit 130)."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["print_figures"]


def print_figures(run: Callable[[], Any], output: str | Path | None) -> int:
    """``run()`` returns the figures; its own cleanup (``finally``, context managers) runs on
    SIGTERM too, because SIGTERM is turned into the KeyboardInterrupt Ctrl-C raises."""

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        out = run()
    except KeyboardInterrupt:
        print("interrupted; every process started was stopped", file=sys.stderr, flush=True)
        return 130
    text = json.dumps(out, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return 0
