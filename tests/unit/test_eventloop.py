"""The server's event loop choice (discovery/eventloop.py): uvloop where installed, asyncio
otherwise or when asked, and a clear error for a choice that cannot work."""

from __future__ import annotations

import asyncio
import sys

import pytest

from discovery import eventloop
from discovery.cli.main import build_parser
from discovery.cli.serve import _event_loop_of
from discovery.config import ServerConfig
from discovery.errors import InvalidArgument


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_auto_runs_on_uvloop_where_it_is_installed() -> None:
    assert eventloop.resolve("auto") == "uvloop"  # a dependency of the project on Linux
    assert eventloop.run(_loop_module, "auto").startswith("uvloop")
    assert eventloop.run(_loop_module, "asyncio").startswith("asyncio")


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert eventloop.resolve("auto") == "asyncio"
    with pytest.raises(InvalidArgument, match="uvloop is not installed"):
        eventloop.run(_loop_module, "uvloop")


def test_an_unknown_choice_names_the_setting() -> None:
    with pytest.raises(InvalidArgument, match="event_loop"):
        eventloop.resolve("trio")
    with pytest.raises(InvalidArgument, match="event_loop"):
        ServerConfig(region="us-east", insecure=True, event_loop="trio").validate()


def test_serve_takes_the_loop_from_the_flag_then_the_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "server.toml"
    config.write_text('[server]\nregion = "us-east"\nevent_loop = "asyncio"\n')
    parse = build_parser().parse_args
    assert _event_loop_of(parse(["serve", "--region", "us-east", "--insecure"])) == "auto"
    assert _event_loop_of(parse(["serve", "--config", str(config)])) == "asyncio"
    assert _event_loop_of(parse(["serve", "--config", str(config), "--event-loop", "uvloop"])) == "uvloop"
