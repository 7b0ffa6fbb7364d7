"""The dashboard (/ui/) in a real headless Chromium (Debian's ``chromium``, driven through
Playwright's Python API; Playwright's own browser download is never used), against a real
``discovery dev``-style cluster over mTLS, the browser presenting STATE_DIR/admin.p12.

It lists the three regions and a registered service; a click shows the service's instances
(record text shown, never run); a registration appears without a reload; a region whose
server and etcd are SIGSTOPped turns stale, and recovers by itself (the page refreshes on the
stream's keepalives and does not poll while the stream is live). The stream opens at the
revision the page already has (``?since=``), a link that is not a valid name shows a notice,
and an identity that may not follow every service is told so and gets a page that refreshes
itself. Screenshots of each state go to tests/artifacts/dashboard/ (git-ignored)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc.aio
import pytest

from discovery.devtools.cluster import ADMIN_P12, ADMIN_P12_PASSWORD, POLICY_FILE, DevCluster, admin_pkcs12
from discovery.security.certs import CertificateAuthority
from discovery_pb.v1 import registry_pb2, registry_pb2_grpc, types_pb2

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
REGIONS = ("us-east", "eu-west", "ap-south")
WAIT_MS = 20_000


def _require_chromium() -> None:
    # A failure, not a skip: a dashboard nobody ran in a browser is not tested.
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium; .ci/run does)")
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[DevCluster]:
    _require_chromium()
    dev = DevCluster(regions=REGIONS, state_dir=tmp_path / "state", mtls=True, http=True, base_port=0)
    try:
        await asyncio.to_thread(dev.start, lambda _line: None)
        yield dev
    finally:
        await asyncio.to_thread(dev.stop)


async def _register(
    cluster: DevCluster, region: str, service: str, instance_id: str, address: str, **fields: Any
) -> None:
    assert cluster.tls is not None
    server = cluster.region(region).servers[0]
    async with grpc.aio.secure_channel(server.address, cluster.tls.credentials()) as channel:
        await registry_pb2_grpc.RegistryStub(channel).Register(
            registry_pb2.RegisterRequest(
                instance=types_pb2.Instance(service=service, instance_id=instance_id, address=address, **fields)
            ),
            timeout=10,
        )


# One browser session walks the states in order (each builds on the one before): one long test.
async def test_dashboard_regions_services_live_updates_and_a_paused_region(cluster: DevCluster) -> None:  # noqa: PLR0915
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()
    assert cluster.state_dir is not None
    us_east = cluster.region("us-east").servers[0]
    assert us_east.http_address is not None
    origin = f"https://{us_east.http_address}"
    hostile = "<img src=x onerror=alert(1)>"
    await _register(
        cluster, "us-east", "web", "web-1", "10.0.0.1:8080", zone="us-east-1a", tags=["canary", "v2"],
        metadata={"build": "2026.11.30", "note": hostile},
    )  # fmt: skip
    await _register(cluster, "us-east", "web", "web-2", "10.0.0.2:8080", status=types_pb2.DRAINING, weight=50)
    await _register(cluster, "eu-west", "web", "web-eu-1", "10.1.0.1:8080", zone="eu-west-1b")
    await _register(cluster, "ap-south", "billing", "billing-1", "10.2.0.1:9000")

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            context = await browser.new_context(
                viewport={"width": 1280, "height": 860},
                ignore_https_errors=True,  # the development CA is not in the browser's store
                client_certificates=[
                    {
                        "origin": origin,
                        "pfxPath": str(cluster.state_dir / ADMIN_P12),
                        "passphrase": ADMIN_P12_PASSWORD.decode(),
                    }
                ],
            )
            page = await context.new_page()
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            dialogs: list[str] = []
            page.on("dialog", lambda d: dialogs.append(d.message))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            response = await page.goto(f"{origin}/ui/")
            assert response is not None and response.status == 200
            assert "default-src 'none'" in (await response.all_headers())["content-security-policy"]

            # The three regions, all connected, and the services.
            cards = page.locator("#regions [data-region]")
            await expect(cards).to_have_count(3, timeout=WAIT_MS)
            assert await cards.evaluate_all("cards => cards.map(c => c.dataset.region)") == list(REGIONS)
            for region in REGIONS:
                await expect(page.locator(f'[data-region="{region}"]')).to_have_attribute(
                    "data-stale", "false", timeout=WAIT_MS
                )
            await expect(page.locator("#live")).to_have_text("live", timeout=WAIT_MS)
            web_row = page.locator('#services [data-service="web"]')
            await expect(web_row).to_be_visible(timeout=WAIT_MS)
            await expect(page.locator('#services [data-service="billing"]')).to_be_visible(timeout=WAIT_MS)
            await expect(web_row.locator("td").nth(1)).to_have_text("3", timeout=WAIT_MS)
            await page.screenshot(path=ARTIFACTS / "1-overview.png", full_page=True)
            # The stream starts at the revision of the listing the page fetched, not with a
            # snapshot of everything again.
            streams = [u for u in requested if urlsplit(u).path == "/v1/events"]
            assert streams, requested
            since = parse_qs(urlsplit(streams[0]).query).get("since", [""])[0]
            assert since.isdigit() and int(since) > 0, streams[0]
            # While the stream is live the page refreshes on its events, not on a timer as well:
            # over 6 s, about one listing per keepalive (2 s apart): 3, where a timer as well makes 6.
            before = sum(urlsplit(u).path == "/v1/services" for u in requested)
            await asyncio.sleep(6)  # a window to count requests in, not a synchronisation
            listings = sum(urlsplit(u).path == "/v1/services" for u in requested) - before
            assert 1 <= listings <= 4, listings

            # The filter box.
            await page.fill("#filter", "bill")
            await expect(web_row).to_be_hidden()
            await page.screenshot(path=ARTIFACTS / "2-filtered.png", full_page=True)
            await page.fill("#filter", "")

            # A click shows the instances, record text as text.
            await web_row.click()
            rows = page.locator("#instances tbody tr")
            await expect(rows).to_have_count(3, timeout=WAIT_MS)
            first = page.locator('#instances [data-instance="web-1"]')
            await expect(first).to_contain_text("10.0.0.1:8080")
            await expect(first).to_contain_text("note=" + hostile)
            await expect(page.locator('#instances [data-instance="web-2"]')).to_contain_text("draining")
            assert await page.locator("#instances img").count() == 0
            await page.screenshot(path=ARTIFACTS / "3-service.png", full_page=True)

            # A registration appears without a reload, in the table and in the recent changes.
            await _register(cluster, "eu-west", "web", "web-eu-2", "10.1.0.2:8080", tags=["new"])
            await expect(page.locator('#instances [data-instance="web-eu-2"]')).to_be_visible(timeout=WAIT_MS)
            await expect(page.locator("#changes li").first).to_contain_text("web-eu-2", timeout=WAIT_MS)
            await page.screenshot(path=ARTIFACTS / "4-live-registration.png", full_page=True)

            # Back to the list: a new service arrives live too.
            await page.click("a.back")
            await _register(cluster, "us-east", "payments", "pay-1", "10.0.0.9:443")
            await expect(page.locator('#services [data-service="payments"]')).to_be_visible(timeout=WAIT_MS)

            # A paused region (its server and etcd SIGSTOPped) turns stale, then recovers.
            ap_south = page.locator('[data-region="ap-south"]')
            await asyncio.to_thread(cluster.pause_region, "ap-south")
            try:
                await expect(ap_south).to_have_attribute("data-stale", "true", timeout=WAIT_MS)
                await expect(ap_south).to_contain_text("stale")
                await page.screenshot(path=ARTIFACTS / "5-region-stale.png", full_page=True)
            finally:
                await asyncio.to_thread(cluster.resume_region, "ap-south")
            await expect(ap_south).to_have_attribute("data-stale", "false", timeout=40_000)
            await expect(ap_south).to_contain_text("connected")
            await page.screenshot(path=ARTIFACTS / "6-region-recovered.png", full_page=True)

            # A link whose fragment is not valid percent-encoding: a notice, the list, no error.
            await page.evaluate("location.hash = '#/services/%E0%A4%A'")
            await expect(page.locator("#notices")).to_contain_text("names no service", timeout=WAIT_MS)
            await expect(page.locator("#list-view")).to_be_visible()
            assert errors == [], errors
            await page.screenshot(path=ARTIFACTS / "7-bad-link.png", full_page=True)
            await page.evaluate("location.hash = '#/'")
            await expect(page.locator("#notices")).to_be_hidden()

            # Phone width: the same page, laid out for it.
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.screenshot(path=ARTIFACTS / "8-phone.png", full_page=True)
            await web_row.click()
            await expect(rows).to_have_count(4, timeout=WAIT_MS)
            await page.screenshot(path=ARTIFACTS / "9-phone-service.png", full_page=True)
            assert dialogs == [], "record text ran as markup"
            assert errors == [], errors

            await _viewer_without_live_updates(cluster, browser, origin)
        finally:
            await browser.close()


async def _viewer_without_live_updates(cluster: DevCluster, browser: Any, origin: str) -> None:
    """An identity that may read ``web`` alone: the event stream of every service answers it
    403, and the page says so and refreshes itself instead."""
    from playwright.async_api import expect

    assert cluster.tls is not None and cluster.state_dir is not None
    viewer = f"spiffe://{cluster.tls.trust_domain}/team/viewer"
    policy = cluster.state_dir / POLICY_FILE
    policy.write_text(policy.read_text() + f'\n[[grant]]\nidentity = "{viewer}"\nread = ["web"]\n')
    ca = CertificateAuthority.load(cluster.tls.dir)
    issued = ca.issue(spiffe_id=viewer)
    p12 = cluster.state_dir / "viewer.p12"
    p12.write_bytes(admin_pkcs12(issued.cert, issued.key, ca.pem, b"viewer"))
    context = await browser.new_context(
        viewport={"width": 1280, "height": 860},
        ignore_https_errors=True,
        client_certificates=[{"origin": origin, "pfxPath": str(p12), "passphrase": "viewer"}],
    )
    try:
        deadline = time.monotonic() + 30  # the servers reload the policy every few seconds
        while (await context.request.get(f"{origin}/v1/services/web")).status != 200:
            assert time.monotonic() < deadline, "the viewer's grant never took effect"
            await asyncio.sleep(0.5)
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(f"{origin}/ui/")
        await expect(page.locator("#live")).to_have_text("polling", timeout=WAIT_MS)
        note = page.locator("#notices")
        await expect(note).to_contain_text("Live updates are off", timeout=WAIT_MS)
        await expect(note).to_contain_text("refreshes itself every 2 s")
        web_row = page.locator('#services [data-service="web"]')
        await expect(web_row).to_be_visible(timeout=WAIT_MS)
        assert await page.locator('#services [data-service="billing"]').count() == 0  # not readable
        count = int(await web_row.locator("td").nth(1).inner_text())
        await _register(cluster, "us-east", "web", "web-3", "10.0.0.3:8080")
        await expect(web_row.locator("td").nth(1)).to_have_text(str(count + 1), timeout=WAIT_MS)
        await page.screenshot(path=ARTIFACTS / "10-viewer-polling.png", full_page=True)
        assert errors == [], errors
    finally:
        await context.close()
