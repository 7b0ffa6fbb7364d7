"""The rule a receiver checks its stale-after against: three of the origin's heartbeats."""

from __future__ import annotations

from discovery.replication.state import silence_warning


def test_three_heartbeats_fit_and_no_warning() -> None:
    assert silence_warning("eu", 3.0, 1000) == ""
    assert silence_warning("eu", 1.5, 500) == ""  # exactly three


def test_fewer_than_three_heartbeats_is_advice_naming_both_settings() -> None:
    warning = silence_warning("eu", 1.0, 500)
    assert warning.startswith("stale-after 1s is under 3 heartbeats of eu (it heartbeats every 0.5s)")
    assert "raise --stale-after to 1.5s or more" in warning and "eu's --replication-heartbeat" in warning


def test_an_unknown_period_warns_about_nothing() -> None:
    # A checkpoint written by a receiver older than the field, or before any contact.
    assert silence_warning("eu", 0.1, 0) == ""
