"""etcd endpoints: what the config accepts, and the gRPC target the store dials."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from discovery import etcd_endpoints
from discovery.config import load
from discovery.errors import InvalidArgument, StoreUnavailable


def _table(table: dict[str, list[str]]) -> etcd_endpoints.Lookup:
    async def lookup(name: str) -> Sequence[str]:
        if name not in table:
            raise OSError(-2, "Name or service not known")
        return table[name]

    return lookup


@pytest.mark.parametrize(
    "endpoints",
    [
        "127.0.0.1:2379",
        "localhost:2379",
        "[::1]:2379",
        "etcd-0.etcd.us-east.svc:2379,etcd-1.etcd.us-east.svc:2379,etcd-2.etcd.us-east.svc:2379",
        "10.0.0.1:2379,[fd00::2]:2379,etcd.example.org:2379",
    ],
)
def test_names_ipv4_and_ipv6_are_accepted(endpoints: str) -> None:
    assert load(None, {"region": "a", "insecure": True, "etcd": endpoints}).etcd == tuple(endpoints.split(","))


@pytest.mark.parametrize(
    ("endpoint", "rule"),
    [
        ("::1:2379", "[ADDR]:PORT"),
        ("etcd_0.svc:2379", "not a valid hostname"),
        ("etcd.svc", "HOST:PORT"),
        ("etcd.svc:0", "port"),
        ("[::zz]:2379", "IPv6"),
    ],
)
def test_a_bad_endpoint_is_refused_naming_the_key(endpoint: str, rule: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        load(None, {"region": "a", "insecure": True, "etcd": endpoint})
    assert caught.value.field == "etcd" and rule in caught.value.rule


def test_the_target_is_ipv4_unless_an_address_is_ipv6() -> None:
    assert etcd_endpoints.target(["10.0.0.1:2379", "10.0.0.2:2379"]) == "ipv4:10.0.0.1:2379,10.0.0.2:2379"
    # One target cannot mix gRPC's ipv4: and ipv6: schemes: IPv4 goes IPv4-mapped.
    assert etcd_endpoints.target(["10.0.0.1:2379", "[::1]:2379"]) == "ipv6:[::ffff:10.0.0.1]:2379,[::1]:2379"


async def test_every_address_of_every_name_is_dialled_once() -> None:
    endpoints = etcd_endpoints.parse(["a.test:2379", "b.test:2379", "10.0.0.9:2379", "[fd00::9]:2379"])
    table = {"a.test": ["10.0.0.1", "fd00::1", "10.0.0.1"], "b.test": ["10.0.0.2", "fe80::1%eth0"]}
    resolved = await etcd_endpoints.resolve(endpoints, _table(table))
    assert resolved.addresses == (
        "10.0.0.1:2379",
        "10.0.0.2:2379",
        "10.0.0.9:2379",
        "[fd00::1]:2379",
        "[fd00::9]:2379",
    )
    assert resolved.failures == ()


async def test_a_name_that_does_not_resolve_is_left_out_while_another_resolves() -> None:
    endpoints = etcd_endpoints.parse(["a.test:2379", "gone.test:2379"])
    resolved = await etcd_endpoints.resolve(endpoints, _table({"a.test": ["10.0.0.1"]}))
    assert resolved.addresses == ("10.0.0.1:2379",)
    assert resolved.failures == ("gone.test:2379 (Name or service not known)",)


async def test_when_no_name_resolves_the_error_names_them() -> None:
    endpoints = etcd_endpoints.parse(["gone.test:2379", "lost.test:2379"])
    with pytest.raises(StoreUnavailable, match=r"gone\.test:2379 .*lost\.test:2379"):
        await etcd_endpoints.resolve(endpoints, _table({}))


async def test_a_resolver_that_hangs_is_given_up_on() -> None:
    async def hang(name: str) -> Sequence[str]:
        await asyncio.Event().wait()
        return []

    endpoints = etcd_endpoints.parse(["slow.test:2379"])
    with pytest.raises(StoreUnavailable, match=r"slow\.test:2379 \(no answer from the resolver within 0.1s\)"):
        await etcd_endpoints.resolve(endpoints, hang, timeout=0.1)


def test_a_name_that_fails_keeps_its_last_addresses() -> None:
    """A member's name gone from DNS a moment (its pod restarting) does not take its address
    out of the channel; a name that never resolved has nothing to keep."""
    endpoints = etcd_endpoints.parse(["etcd-0.svc:2379", "etcd-1.svc:2379", "etcd-2.svc:2379"])
    table = {"etcd-0.svc": ["10.0.0.1"], "etcd-1.svc": ["10.0.0.2"], "etcd-2.svc": ["10.0.0.3"]}
    first = asyncio.run(etcd_endpoints.resolve(endpoints, _table(table)))
    assert first.addresses == ("10.0.0.1:2379", "10.0.0.2:2379", "10.0.0.3:2379") and not first.failures
    del table["etcd-1.svc"]
    again = asyncio.run(etcd_endpoints.resolve(endpoints, _table(table), keep=first.by_endpoint))
    assert again.addresses == first.addresses and again.failures and "etcd-1.svc:2379" in again.failures[0]
    fresh = asyncio.run(etcd_endpoints.resolve(endpoints, _table(table)))
    assert fresh.addresses == ("10.0.0.1:2379", "10.0.0.3:2379")  # nothing kept without a past


def test_a_hung_resolver_gets_one_lookup_per_name_not_one_per_try(monkeypatch: pytest.MonkeyPatch) -> None:
    """getaddrinfo runs in a thread a timeout cannot stop: asks while one is running join it."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        calls: list[str] = []
        release = asyncio.Event()

        async def getaddrinfo(host: str, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
            calls.append(host)
            await release.wait()  # a resolver that does not answer
            return [(0, 0, 0, "", ("10.0.0.9", 0))]

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        endpoints = etcd_endpoints.parse(["etcd.svc:2379"])
        for _ in range(3):
            with pytest.raises(StoreUnavailable, match="no answer from the resolver"):
                await etcd_endpoints.resolve(endpoints, timeout=0.05)
        assert calls == ["etcd.svc"]  # one lookup in flight, however often it is asked
        release.set()
        async with asyncio.timeout(5):
            resolved = await etcd_endpoints.resolve(endpoints, timeout=1)
        assert resolved.addresses == ("10.0.0.9:2379",) and calls == ["etcd.svc"]

    asyncio.run(scenario())
