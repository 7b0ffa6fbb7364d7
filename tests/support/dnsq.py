"""DNS clients for tests: dnspython's async queries, and the real ``dig`` (Debian's
bind9-dnsutils; ``.ci/run`` installs it)."""

from __future__ import annotations

import asyncio
import shutil

import dns.asyncquery
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype

TIMEOUT = 3.0


def make(name: str, rdtype: str = "A", *, edns: int | None = None, payload: int = 1232) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, use_edns=edns if edns is not None else False, payload=payload)
    return query


async def udp(port: int, name: str, rdtype: str = "A", **kwargs: int) -> dns.message.Message:
    """One UDP query; a truncated answer is returned as is (TC set), not raised."""
    return await dns.asyncquery.udp(
        make(name, rdtype, **kwargs), "127.0.0.1", port=port, timeout=TIMEOUT, raise_on_truncation=False
    )


async def tcp(port: int, name: str, rdtype: str = "A", **kwargs: int) -> dns.message.Message:
    return await dns.asyncquery.tcp(make(name, rdtype, **kwargs), "127.0.0.1", port=port, timeout=TIMEOUT)


def addresses(response: dns.message.Message, rdtype: str = "A") -> set[str]:
    wanted = dns.rdatatype.from_text(rdtype)
    return {rd.to_text() for rrset in response.answer if rrset.rdtype == wanted for rd in rrset}


def srv(response: dns.message.Message) -> list[tuple[int, int, int, str]]:
    """(priority, weight, port, target) of every SRV record, sorted."""
    return sorted(
        (rd.priority, rd.weight, rd.port, rd.target.to_text())
        for rrset in response.answer
        if rrset.rdtype == dns.rdatatype.SRV
        for rd in rrset
    )


def rcode(response: dns.message.Message) -> str:
    return dns.rcode.to_text(response.rcode())


def soa_in_authority(response: dns.message.Message) -> bool:
    return any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority)


def dig_path() -> str:
    path = shutil.which("dig")
    if path is None:
        raise AssertionError("these tests need dig: apt-get install -y bind9-dnsutils (.ci/run installs it)")
    return path


async def dig(port: int, *args: str) -> str:
    """``dig @127.0.0.1 -p PORT ARGS``: its stdout. Fails the test if dig fails."""
    proc = await asyncio.create_subprocess_exec(
        dig_path(),
        "@127.0.0.1",
        "-p",
        str(port),
        "+time=2",
        "+tries=1",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(15):
        out, err = await proc.communicate()
    assert proc.returncode == 0, f"dig {' '.join(args)} exited {proc.returncode}: {out.decode()}{err.decode()}"
    return out.decode()
