"""`discovery serve --help` shows a config file: it must be one serve would accept, and the
help must read in a terminal 80 columns wide."""

from __future__ import annotations

import contextlib
import tomllib

import pytest

from discovery.cli.main import build_parser
from discovery.config import _build
from tests.support.helpers import serve_help_config


def test_the_config_file_in_serve_help_is_valid() -> None:
    values = tomllib.loads(serve_help_config())
    assert len(values) > 20
    values["peers"] = tuple(values["peers"])
    values["etcd"] = tuple(values["etcd"])
    # Certificates are read at start, not by validation: the example's paths need not exist.
    assert _build(values).region == "us-east"


VERBS = [
    [],
    ["serve"],
    ["dev"],
    ["register"],
    ["deregister"],
    ["resolve"],
    ["watch"],
    ["status"],
    ["health"],
    ["xds-bootstrap"],
    ["xds-clients"],
    ["drill"],
    ["certs"],
    ["certs", "issue"],
    ["certs", "ca"],
]


@pytest.mark.parametrize("verb", VERBS, ids=lambda verb: " ".join(verb) or "top-level")
def test_every_help_fits_80_columns(verb: list[str], capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    with contextlib.suppress(SystemExit):
        parser.parse_args([*verb, "--help"])
    text = capsys.readouterr().out
    assert text and all(len(line) <= 80 for line in text.splitlines()), [
        line for line in text.splitlines() if len(line) > 80
    ]


def test_the_examples_continue_lines_with_one_backslash(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A line ending in a doubled backslash would not continue the command in a shell.
    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    for verb in VERBS:
        with contextlib.suppress(SystemExit):
            parser.parse_args([*verb, "--help"])
        text = capsys.readouterr().out
        assert not [line for line in text.splitlines() if line.endswith("\\\\")], verb
