"""The audit log: its lines, what can never be in them, rotation, and failing closed or open."""

from __future__ import annotations

import json
import logging
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from discovery.security import audit as audit_module
from discovery.security.audit import REDACTED, AuditLog, AuditUnavailable
from discovery.security.certs import CertificateAuthority
from discovery.security.identity import Caller

WEB = "spiffe://example.org/svc/web"
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(autouse=True)
def closes_every_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every AuditLog a test makes is closed after it (an open file at exit is a warning, an error here)."""
    made: list[AuditLog] = []
    real_init = AuditLog.__init__

    def init(self: AuditLog, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(AuditLog, "__init__", init)
    yield
    for log in made:
        log.close()


@pytest.fixture
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit_module, "RETRY_SECONDS", 0.0)


def test_one_json_line_with_only_the_given_fields(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), region="us-east")
    log.record(
        "write",
        identity=WEB,
        serial="4F3A",
        peer="ipv4:10.0.0.7:53122",
        method="/discovery.v1.Registry/Register",
        service="web",
        instance="web-1",
        outcome="ok",
        code=grpc.StatusCode.OK,
        revision=42,
    )
    log.record("denied", identity=WEB, service="payments", code="PERMISSION_DENIED", message="may not")
    log.close()
    first, second = lines(path)
    assert TIME.fullmatch(first.pop("time"))
    assert first == {
        "region": "us-east",
        "event": "write",
        "identity": WEB,
        "serial": "4F3A",
        "peer": "ipv4:10.0.0.7:53122",
        "method": "/discovery.v1.Registry/Register",
        "service": "web",
        "instance": "web-1",
        "outcome": "ok",
        "code": "OK",
        "revision": 42,
    }
    assert set(second) == {"time", "region", "event", "identity", "service", "code", "message"}
    assert list(json.loads(path.read_text().splitlines()[0]))[:3] == ["time", "region", "event"]


def test_file_is_private_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"old":1}\n')
    path.chmod(0o600)
    AuditLog(str(path), region="r").record("write", service="a")
    fresh = tmp_path / "new.log"
    AuditLog(str(fresh), region="r").record("write", service="b")
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    assert [line.get("service") for line in lines(path)] == [None, "a"]


def test_no_pem_ever(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    issued = ca.issue(spiffe_id=WEB)
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), region="r")
    log.record("denied", message="bad cert: " + issued.cert.decode(), instance=issued.key.decode())
    text = path.read_text()
    assert "BEGIN" not in text and "PRIVATE" not in text
    assert lines(path)[0]["message"] == REDACTED and lines(path)[0]["instance"] == REDACTED


def test_only_known_scalar_fields() -> None:
    log = AuditLog("", region="r")
    with pytest.raises(TypeError):
        log.record("write", metadata={"secret": "x"})  # type: ignore[call-arg]
    on = AuditLog("-", region="r")
    with pytest.raises(TypeError, match="'message' must be a string or a number"):
        on.record("write", message={"secret": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lowercase word"):
        on.record("Write Event")


def test_long_values_are_cut(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    AuditLog(str(path), region="r").record("denied", message="x" * 100_000)
    assert len(lines(path)[0]["message"]) == audit_module.MAX_VALUE_LEN


def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog("-", region="eu-west")
    log.ensure_writable()
    log.record("policy_reloaded", message="policy p reloaded")
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert json.loads(out)["event"] == "policy_reloaded" and json.loads(out)["region"] == "eu-west"


def test_off_does_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog("", region="r")
    assert not log.enabled
    log.ensure_writable()
    log.record("write", service="x")
    log.reopen()
    log.close()
    assert capsys.readouterr().out == ""


def test_reopen_after_rename(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), region="r")
    log.record("write", instance="before")
    path.rename(tmp_path / "audit.log.1")
    log.record("write", instance="still the old file, until told")
    log.reopen()
    log.record("write", instance="after")
    assert [line["instance"] for line in lines(tmp_path / "audit.log.1")] == [
        "before",
        "still the old file, until told",
    ]
    assert [line["instance"] for line in lines(path)] == ["after"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_fail_closed_on_an_unwritable_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "missing-dir" / "audit.log"
    with caplog.at_level(logging.ERROR, logger="discovery.security.audit"):
        log = AuditLog(str(path), region="r")
    assert log.problem
    with pytest.raises(AuditUnavailable) as e:
        log.ensure_writable()
    assert str(path) in str(e.value) and "No such file or directory" in str(e.value)
    log.record("write", service="x")  # the write it describes happened: record does not raise
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and str(path) in errors[0].getMessage() and "refused" in errors[0].getMessage()


def test_write_failure_then_fail_closed(tmp_path: Path) -> None:
    log = AuditLog("/dev/full", region="r")
    log.ensure_writable()  # opening works; only writing shows the disk is full
    log.record("write", service="x")
    with pytest.raises(AuditUnavailable, match="/dev/full: No space left on device"):
        log.ensure_writable()


def test_fail_open_logs_once_per_streak(tmp_path: Path, caplog: pytest.LogCaptureFixture, no_retry_delay: None) -> None:
    path = tmp_path / "missing-dir" / "audit.log"
    with caplog.at_level(logging.INFO, logger="discovery.security.audit"):
        log = AuditLog(str(path), region="r", fail_open=True)
        for _ in range(5):
            log.ensure_writable()  # no raise, however often it is retried
            log.record("write", service="x")
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "UNAUDITED" in errors[0].getMessage()

        path.parent.mkdir()
        log.ensure_writable()
        log.record("write", service="y")
        (resumed, written) = lines(path)
        assert resumed["event"] == "audit_resumed" and "5 lines were lost" in resumed["message"]
        assert written["service"] == "y"
        assert any(r.levelno == logging.WARNING and "writable again" in r.getMessage() for r in caplog.records)

        path.unlink()
        path.parent.rmdir()
        log.reopen()
        log.ensure_writable()
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2  # a new streak, a new error


def test_recovery_from_fail_closed(tmp_path: Path, no_retry_delay: None) -> None:
    path = tmp_path / "missing-dir" / "audit.log"
    log = AuditLog(str(path), region="r")
    with pytest.raises(AuditUnavailable):
        log.ensure_writable()
    path.parent.mkdir()
    log.ensure_writable()
    assert not log.problem
    assert lines(path)[0]["event"] == "audit_resumed"


def test_retries_are_spaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "missing-dir" / "audit.log"
    log = AuditLog(str(path), region="r")
    opens = 0
    real = log._open

    def counting() -> None:
        nonlocal opens
        opens += 1
        real()

    monkeypatch.setattr(log, "_open", counting)
    for _ in range(100):
        with pytest.raises(AuditUnavailable):
            log.ensure_writable()
    assert opens <= 1


def test_caller_fills_identity_serial_and_peer(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), region="r")
    log.record("stream_start", caller=Caller(WEB, "4F3A", "ipv4:10.0.0.7:1"), method="/discovery.v1.Registry/Heartbeat")
    log.record("write", caller=Caller("anonymous", "", "ipv4:10.0.0.8:2", anonymous=True), identity="override")
    first, second = lines(path)
    assert (first["identity"], first["serial"], first["peer"]) == (WEB, "4F3A", "ipv4:10.0.0.7:1")
    assert second["identity"] == "override" and "serial" not in second and second["peer"] == "ipv4:10.0.0.8:2"
