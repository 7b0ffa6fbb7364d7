"""The policy file: parsing (unknown keys and ambiguous patterns are errors that name the file
and the key), matching, limits precedence, the messages, and reloading."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from discovery.security.policy import (
    DEFAULT_LIMITS,
    UNLIMITED,
    Grants,
    Limits,
    Policy,
    PolicyError,
    PolicyFile,
    denial_message,
    denied_identity_message,
    unknown_identity_message,
)

SVC = "spiffe://example.org/svc"
WEB = f"{SVC}/web"
ADMIN = "spiffe://example.org/ops/admin"

DEV = f"""
deny = ["{SVC}/retired"]
[region]
max_instances = 500
[limits]
writes_per_second = 20.0
streams = 7
[[grant]]
identity = "{SVC}/*"
register = ["{{name}}", "{{name}}.*"]
read = ["*"]
[[grant]]
identity = "{ADMIN}"
admin = true
read = ["*"]
[[grant]]
identity = "spiffe://example.org/discovery/server/*"
replicate = true
read = ["*"]
"""


def parse(text: str) -> Policy:
    return Policy.parse(text, "policy.toml")


def grants(policy: Policy, identity: str) -> Grants:
    g = policy.grants_for(identity)
    assert g is not None, identity
    return g


# --- matching -------------------------------------------------------------------------------


def test_name_substitution_and_subtree() -> None:
    web = grants(parse(DEV), WEB)
    assert web.register_patterns == ("web", "web.*")
    assert web.read_patterns == ("*",)
    for ok in ("web", "web.api", "web.api.v1"):
        assert web.may_register(ok)
    for no in ("webx", "we", "payments", "web-api", "x.web"):
        assert not web.may_register(no)
    assert web.may_read("payments") and web.may_read("*") and web.may_read_all
    assert not web.replicate and not web.admin


def test_subtree_never_matches_a_sibling_prefix_nor_itself() -> None:
    g = grants(parse(f'[[grant]]\nidentity = "{WEB}"\nregister = ["payments.*"]\nread = ["payments"]'), WEB)
    assert g.may_register("payments.eu") and g.may_register("payments.eu.card")
    assert not g.may_register("payroll") and not g.may_register("payments") and not g.may_register("paymentsx")
    assert g.may_read("payments") and not g.may_read("payments.eu")
    assert not g.may_read("*") and not g.may_read_all


def test_wildcard_identity_matches_deeper_paths_but_name_only_one_segment() -> None:
    policy = parse(DEV)
    deep = grants(policy, f"{SVC}/web/canary")
    assert deep.register_patterns == ()  # {name} would be "web/canary": not a service name
    assert deep.may_read("web")
    assert policy.grants_for(SVC) is None  # the pattern's own path is not under it
    assert policy.grants_for("spiffe://example.org/svcx/web") is None


def test_name_that_is_not_a_service_name_grants_nothing() -> None:
    g = grants(parse(DEV), f"{SVC}/Web_Thing")
    assert g.register_patterns == ()
    assert not g.may_register("Web_Thing") and not g.may_register("web_thing")


def test_dotted_name_segment() -> None:
    g = grants(parse(DEV), f"{SVC}/payments.eu")
    assert g.may_register("payments.eu") and g.may_register("payments.eu.card")
    assert not g.may_register("payments")


def test_union_of_grants() -> None:
    policy = parse(
        DEV
        + f"""
[[grant]]
identity = "{WEB}"
register = ["shared.cache"]
admin = true
"""
    )
    web = grants(policy, WEB)
    assert web.identity_patterns == (f"{SVC}/*", WEB)
    assert web.register_patterns == ("web", "web.*", "shared.cache")
    assert web.may_register("shared.cache") and web.may_register("web.x") and web.admin
    assert not grants(policy, f"{SVC}/api").admin


def test_default_deny() -> None:
    policy = parse(DEV)
    assert policy.grants_for("spiffe://example.org/other/thing") is None
    assert policy.grants_for("legacy-cn") is None
    assert parse("").grants_for(WEB) is None


def test_deny_wins_over_grants() -> None:
    policy = parse(DEV)
    assert policy.denied(f"{SVC}/retired") and policy.grants_for(f"{SVC}/retired") is None
    assert not policy.denied(WEB)


def test_cn_identity() -> None:
    g = grants(parse('[[grant]]\nidentity = "legacy-batch"\nread = ["batch.*"]'), "legacy-batch")
    assert g.may_read("batch.jobs")


def test_replicate_and_admin() -> None:
    policy = parse(DEV)
    assert grants(policy, "spiffe://example.org/discovery/server/us-east").replicate
    assert grants(policy, ADMIN).admin and not grants(policy, ADMIN).may_register("web")


def test_allow_all() -> None:
    policy = Policy.allow_all()
    g = grants(policy, "anonymous")
    assert g.may_register("anything.at.all") and g.may_read("*") and g.replicate and g.admin
    assert g.limits == UNLIMITED and policy.region_max_instances == 0 and not policy.denied("anonymous")
    assert grants(Policy.allow_all(DEFAULT_LIMITS), "anonymous").limits == DEFAULT_LIMITS


def test_grants_are_cached_and_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import discovery.security.policy as module

    monkeypatch.setattr(module, "GRANTS_CACHE_SIZE", 4)
    policy = parse(DEV)
    assert policy.grants_for(WEB) is policy.grants_for(WEB)
    for i in range(20):
        policy.grants_for(f"{SVC}/s{i}")
    assert len(policy._cache) <= 4


# --- limits ---------------------------------------------------------------------------------


def test_limits_precedence() -> None:
    policy = parse(
        DEV
        + f"""
[[grant]]
identity = "{SVC}/*"
[grant.limits]
writes_per_second = 5.0
instances = 30
[[grant]]
identity = "{SVC}/web/*"
[grant.limits]
writes_per_second = 3.0
[[grant]]
identity = "{WEB}"
[grant.limits]
writes_per_second = 1.0
"""
    )
    assert policy.region_max_instances == 500
    # exact over every pattern; unset fields fall through to less specific grants, then [limits]
    assert grants(policy, WEB).limits == Limits(1.0, 100, 7, 1000, 30)
    # longer pattern over shorter
    assert grants(policy, f"{SVC}/web/canary").limits == Limits(3.0, 100, 7, 1000, 30)
    assert grants(policy, f"{SVC}/api").limits == Limits(5.0, 100, 7, 1000, 30)
    # [limits] over built-in defaults
    assert grants(policy, ADMIN).limits == Limits(20.0, 100, 7, 1000, 10000)
    assert grants(parse(f'[[grant]]\nidentity = "{WEB}"'), WEB).limits == DEFAULT_LIMITS


def test_integer_rate_is_a_float() -> None:
    g = grants(parse(f'[[grant]]\nidentity = "{WEB}"\n[grant.limits]\nwrites_per_second = 2'), WEB)
    assert g.limits.writes_per_second == 2.0 and isinstance(g.limits.writes_per_second, float)


def test_conflicting_limits_for_one_identity_are_an_error() -> None:
    one = f'[[grant]]\nidentity = "{WEB}"\nlimits = {{streams = 1}}\n'
    text = one + one.replace("1", "2")
    with pytest.raises(PolicyError, match=r"limits\.streams to 1 and 2"):
        parse(text)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour = 1", "policy.toml: unknown key 'colour' in the top level"),
        ("[limits]\nwrites_per_sec = 1", "policy.toml: unknown key 'writes_per_sec' in [limits]"),
        ("[region]\nmax = 1", "unknown key 'max' in [region]"),
        (
            f'[[grant]]\nidentity = "{WEB}"\nregistr = ["web"]',
            f"unknown key 'registr' in [[grant]] #1 (identity '{WEB}')",
        ),
        (
            f'[[grant]]\nidentity = "{WEB}"\n[grant.limits]\nburst = 1',
            "unknown key 'burst' in [grant.limits] of [[grant]] #1",
        ),
        ('[[grant]]\nread = ["*"]', "[[grant]] #1 has no 'identity'"),
        ("[grant]\nidentity = 'x'", "write [[grant]]"),
        ("deny = 'x'", "deny must be an array of strings"),
        (f'[[grant]]\nidentity = "{WEB}"\nadmin = 1', "'admin' must be true or false"),
        (f'[[grant]]\nidentity = "{WEB}"\nread = "web"', "key 'read' must be an array of strings"),
        ("[limits]\nstreams = -1", "'streams' must be a whole number >= 0"),
        ("[limits]\nstreams = 1.5", "'streams' must be a whole number >= 0"),
        ("[limits]\nwrites_per_second = -1.0", "'writes_per_second' must be a number >= 0"),
        ("[limits]\nwrites_per_second = nan", "'writes_per_second' must be a number >= 0"),
        ("[region]\nmax_instances = true", "'max_instances' must be a whole number"),
        ("this is not toml", "policy.toml: not valid TOML"),
    ],
)
def test_errors_name_the_file_table_and_key(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse(text)
    assert expected in str(e.value)


@pytest.mark.parametrize("pattern", ["pay*", "*.x", "a.*.b", "payments.**", "*payments", "**"])
def test_ambiguous_service_patterns_are_rejected(pattern: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse(f'[[grant]]\nidentity = "{WEB}"\nregister = ["{pattern}"]')
    assert f"pattern {pattern!r} is ambiguous" in str(e.value)
    assert "key 'register'" in str(e.value) and "payments.*" in str(e.value)


@pytest.mark.parametrize("pattern", ["Web", "web_api", "", "web.", ".web", "{nam}", "{name}x{"])
def test_invalid_service_names_are_rejected(pattern: str) -> None:
    with pytest.raises(PolicyError, match="key 'read'"):
        parse(f'[[grant]]\nidentity = "{SVC}/*"\nread = ["{pattern}"]')


@pytest.mark.parametrize(
    "identity",
    ["*", f"{SVC}/*/web", f"{SVC}*", "spiffe://Example.org/svc/web", "spiffe://example.org/", "two words"],
)
def test_invalid_identity_patterns_are_rejected(identity: str) -> None:
    with pytest.raises(PolicyError, match="identity"):
        parse(f'[[grant]]\nidentity = "{identity}"')


def test_name_needs_a_wildcard_identity() -> None:
    with pytest.raises(PolicyError, match=r"uses \{name\}, which needs an identity ending in /\*"):
        parse(f'[[grant]]\nidentity = "{WEB}"\nregister = ["{{name}}"]')


def test_trust_domain_wildcard_is_allowed() -> None:
    assert grants(parse('[[grant]]\nidentity = "spiffe://example.org/*"\nread = ["*"]'), WEB).may_read("x")


# --- messages -------------------------------------------------------------------------------


def test_messages() -> None:
    policy = parse(DEV)
    web = policy.grants_for(WEB)
    assert (
        denial_message(WEB, "register", "payments", web) == f"{WEB} may not register 'payments' (allowed: web, web.*)"
    )
    assert denial_message(WEB, "read", "*", grants(parse(f'[[grant]]\nidentity = "{WEB}"\nread = ["web"]'), WEB)) == (
        f"{WEB} may not read every service (allowed: web)"
    )
    assert denial_message(WEB, "register", "x", None) == f"{WEB} may not register 'x' (allowed: none)"
    assert (
        denial_message(WEB, "replicate", "", web) == f"{WEB} may not replicate (needs replicate = true in a [[grant]])"
    )
    assert unknown_identity_message(WEB) == f"certificate identity {WEB} is not in this server's policy"
    assert "revoked" in denied_identity_message(WEB)


# --- the file, reloaded ---------------------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.arrived = asyncio.Event()

    def __call__(self, event: str, message: str) -> None:
        self.seen.append((event, message))
        self.arrived.set()

    async def next(self) -> tuple[str, str]:
        async with asyncio.timeout(5):
            await self.arrived.wait()
        self.arrived.clear()
        return self.seen[-1]


_versions = iter(range(1, 1_000_000))


def write(path: Path, text: str) -> None:
    """Write and give the file a new mtime, so a rewrite within one clock tick still shows."""
    path.write_text(text)
    os.utime(path, ns=(0, 1_700_000_000_000_000_000 + next(_versions) * 1_000_000_000))


def test_bad_file_at_start_raises(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    with pytest.raises(PolicyError, match="cannot read"):
        PolicyFile(path)
    path.write_text("[limits]\nstreamz = 1")
    with pytest.raises(PolicyError, match=f"{path}: unknown key 'streamz'"):
        PolicyFile(path)


def test_reload_and_a_bad_reload_keeps_the_old_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "policy.toml"
    write(path, DEV)
    events = Events()
    pf = PolicyFile(path, on_event=events)
    first = pf.current
    assert pf.check() is False and pf.current is first and events.seen == []

    write(path, DEV + f'[[grant]]\nidentity = "{WEB}"\nadmin = true\n')
    assert pf.check() is True
    assert grants(pf.current, WEB).admin
    assert events.seen[-1][0] == "policy_reloaded" and str(path) in events.seen[-1][1]

    good = pf.current
    write(path, DEV + "[[grant]]\nidentity = 'x'\nregister = ['pay*']\n")
    with caplog.at_level(logging.WARNING, logger="discovery.security.policy"):
        assert pf.check() is False
    assert pf.current is good
    event, message = events.seen[-1]
    assert event == "policy_rejected"
    assert "pay*" in message and str(path) in message and "keeping the previous policy" in message
    assert any(r.levelno == logging.WARNING and "pay*" in r.getMessage() for r in caplog.records)

    # reported once per version of the file, not once per poll; a SIGHUP rereads it
    count = len(events.seen)
    assert pf.check() is False and len(events.seen) == count
    pf.request_reload()
    assert pf.check() is False and len(events.seen) == count + 1

    path.unlink()
    assert pf.check() is False and pf.current is good
    assert events.seen[-1][0] == "policy_rejected" and "cannot read" in events.seen[-1][1]

    write(path, DEV)
    assert pf.check() is True and not grants(pf.current, WEB).admin


def test_reload_on_request_even_if_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    write(path, DEV)
    pf = PolicyFile(path)
    assert pf.check() is False
    pf.request_reload()
    assert pf.check() is True


def test_a_failing_event_handler_does_not_stop_the_reload(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    write(path, DEV)

    def explode(event: str, message: str) -> None:
        raise RuntimeError("boom")

    pf = PolicyFile(path, on_event=explode)
    write(path, "")
    assert pf.check() is True and pf.current.grants_for(WEB) is None


async def test_run_polls_and_wakes_on_request(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    write(path, DEV)
    events = Events()
    pf = PolicyFile(path, on_event=events)
    task = asyncio.create_task(pf.run(poll_seconds=0.02))
    try:
        write(path, "")
        assert (await events.next())[0] == "policy_reloaded"
        assert pf.current.grants_for(WEB) is None
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    slow = PolicyFile(path, on_event=events)
    task = asyncio.create_task(slow.run(poll_seconds=3600))
    try:
        events.arrived.clear()
        slow.request_reload()
        assert (await events.next())[0] == "policy_reloaded"
    finally:
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
