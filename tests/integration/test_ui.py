"""The web UI end to end: order sagas and waiting workflows run through a real
orchestrator and the example participants, the projector writes them to PostgreSQL and
serves the UI, and headless Chromium (Debian's package, driven by Playwright) uses it as a
person would: counts, filters, a compensated saga's timeline, and a signal, a cancel and a
resume sent from the page (the resume to a workflow whose id, ``..``, is a URL dot segment).
It keeps screenshots in the test's directory and in .stack/artifacts/
(``SAGALINE_UPDATE_SCREENSHOT=1`` also refreshes docs/ui.png, the committed one), so a test
run leaves the working tree clean.

The orchestrator runs ``registry`` below (``tests.integration.test_ui:registry``): the
order saga beside two workflows of ``tests.integration.control`` that wait for control.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import pytest
from pydantic import SecretStr

from examples.order_saga.harness import ROOT, free_port, make_orders
from examples.order_saga.workflows import process_order
from orchestrator import WorkflowRegistry
from orchestrator.client import WorkflowClient
from orchestrator.settings import KafkaSettings, ProjectorSettings
from tests.integration.control import approval, reserve_then_wait
from tests.integration.pipeline import Saga, projecting

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = pytest.mark.integration

registry = WorkflowRegistry()
registry.workflow("order.process")(process_order)
registry.workflow("control.approval")(approval)
registry.workflow("control.reserve_then_wait")(reserve_then_wait)

APP = "tests.integration.test_ui:registry"
SCREENSHOT = ROOT / "docs" / "ui.png"
ARTIFACTS = ROOT / ".stack" / "artifacts"
# Long enough for a loaded 2-core machine; every wait ends as soon as its condition holds.
WAIT_MS = 60_000


def chromium_path() -> str:
    """The Chromium binary to drive: ``SAGALINE_CHROMIUM``, else Debian's package."""
    given = os.environ.get("SAGALINE_CHROMIUM")
    found = given or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not Path(found).exists():
        pytest.fail(
            "headless Chromium is missing: install Debian's package (apt-get install "
            "chromium) or set SAGALINE_CHROMIUM to a Chromium binary"
            + (f" (SAGALINE_CHROMIUM={given!r} does not exist)" if given else ""),
            pytrace=False,
        )
    return found


@contextmanager
def projector_with_ui(settings: ProjectorSettings) -> Iterator[str]:
    """Run the projector, which serves the UI on ``settings.ui_port``, in a thread; yield
    the UI's address once it answers."""
    url = f"http://127.0.0.1:{settings.ui_port}/"
    with projecting(settings) as failure:
        deadline = time.monotonic() + 60
        while True:
            assert not failure, f"the projector failed: {failure[0]!r}"
            try:
                with urllib.request.urlopen(f"{url}healthz", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"the UI at {url} never answered /healthz"
            # Polling a port that is about to open: the condition above is what we wait on.
            time.sleep(0.1)
        yield url


def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET ``url``; the status and the JSON body, for success and failure alike."""
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def open_workflow(page: Page, url: str, workflow_id: str) -> None:
    """Show one workflow's page, as a link to it does."""
    page.goto(f"{url}#/workflow/{quote(workflow_id, safe='')}")
    page.locator("#wf-id").filter(has_text=workflow_id).wait_for(timeout=WAIT_MS)


def test_the_ui_lists_explains_and_acts_on_real_workflows(saga: Saga, tmp_path: Path) -> None:
    chromium = chromium_path()
    try:
        from playwright.sync_api import expect, sync_playwright  # noqa: PLC0415
    except ImportError as exc:
        pytest.fail(
            f"Playwright for Python is missing ({exc}): pip install -e '.[dev]'", pytrace=False
        )

    run = uuid.uuid4().hex[:6]
    orders = make_orders(6, declined_every=3, run_id=run)  # orders 2 and 5 are declined
    declined = sorted(o["order_id"] for o in orders if o["card"] == "declined")
    waiting_for_signal = f"approval-{run}/needs a signal"  # "/" and " " travel encoded
    holding_stock = f"hold-{run}"
    # The database is the test's own: an id browsers drop from URL paths (a dot segment)
    # has to be shown and acted on all the same.
    stuck = ".."

    saga.orchestrator("ui", app=APP)
    saga.start_participants()
    saga.start_orders(orders)
    client = WorkflowClient(
        KafkaSettings(kafka_bootstrap=saga.bootstrap, topic_prefix=saga.topics.prefix)
    )
    client.start("control.approval", {"timeout_s": 3600}, workflow_id=waiting_for_signal)
    client.start(
        "control.reserve_then_wait",
        {"order_id": holding_stock, "items": [{"sku": "sku-ui", "qty": 1}]},
        workflow_id=holding_stock,
    )
    # No deployment has this type: the orchestrator keeps it STUCK with the reason.
    client.start("control.not_deployed", {}, workflow_id=stuck)
    client.flush()
    saga.finish(orders)

    settings = ProjectorSettings(
        kafka_bootstrap=saga.bootstrap,
        topic_prefix=saga.topics.prefix,
        postgres_dsn=SecretStr(saga.dsn),
        projector_group_id=f"ui-{run}",
        metrics_port=0,
        ui_port=free_port(),
    )
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with projector_with_ui(settings) as url, sync_playwright() as playwright:
        status, answer = get_json(f"{url}api/workflows?status=NOPE")
        assert status == 400, answer
        assert answer["error"].startswith("status: unknown status 'NOPE'"), answer
        # A page of another site re-pointed here by DNS sends its own name: refused, but
        # probes (any Host) are answered.
        status, answer = get_json(f"{url}api/workflows", {"Host": "rebound.example:9430"})
        assert status == 403, answer
        assert "SAGALINE_UI_ALLOWED_HOSTS" in answer["error"], answer
        assert get_json(f"{url}healthz", {"Host": "10.1.2.3"}) == (200, {"ok": True})

        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 960})
        page.set_default_timeout(WAIT_MS)
        expect.set_options(timeout=WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            # The list: every workflow, and the counts by status (the page reads the API
            # again every few seconds until the projector has caught up).
            page.goto(url)

            def count_of(status: str) -> Locator:
                return page.locator(f'#chips .chip[data-status="{status}"] .chip-count')

            expect(count_of("COMPLETED")).to_have_text("4", timeout=WAIT_MS)
            expect(count_of("COMPENSATED")).to_have_text("2")
            expect(count_of("RUNNING")).to_have_text("2")
            expect(count_of("STUCK")).to_have_text("1")
            expect(page.locator('#chips .chip[data-status=""] .chip-count')).to_have_text("9")
            rows = page.locator("#workflows tbody tr")
            expect(rows).to_have_count(9)
            for order in orders:
                expect(rows.filter(has_text=order["order_id"])).to_have_count(1)
            page.screenshot(path=shots / "list.png", full_page=True)

            # A status chip narrows the list to that status; the counts stay.
            page.locator('#chips .chip[data-status="COMPENSATED"]').click()
            expect(rows).to_have_count(2)
            for order_id in declined:
                expect(rows.filter(has_text=order_id)).to_have_count(1)
            expect(page.locator('#workflows tbody tr[data-status="COMPENSATED"]')).to_have_count(2)
            assert "status=COMPENSATED" in page.url
            # So does the type filter of the form.
            page.locator('#chips .chip[data-status=""]').click()
            expect(rows).to_have_count(9)
            page.fill("#f-type", "control.approval")
            page.click("#f-apply")
            expect(rows).to_have_count(1)
            expect(rows.first).to_have_attribute("data-workflow-id", waiting_for_signal)

            # A compensated saga's timeline: its steps, the declined charge, the release.
            page.goto(f"{url}#/?status=COMPENSATED")
            page.locator("#workflows tbody a", has_text=declined[0]).click()
            expect(page.locator("#wf-status")).to_have_text("COMPENSATED")
            timeline = page.locator("#timeline")
            reserve = timeline.locator('li.step[data-step="activity"]').filter(
                has_text="inventory.reserve"
            )
            expect(reserve).to_have_attribute("data-outcome", "completed")
            charge = timeline.locator('li.step[data-step="activity"]').filter(
                has_text="payment.charge"
            )
            expect(charge).to_have_attribute("data-outcome", "failed")
            expect(charge.locator(".event-error")).to_contain_text("PaymentDeclined")
            release = timeline.locator('li.step[data-step="compensation"]')
            expect(release).to_have_count(1)
            expect(release).to_contain_text("inventory.release")
            expect(release.locator(".tag")).to_have_text("compensation")
            expect(release).to_have_attribute("data-outcome", "completed")
            expect(page.locator("#wf-problem")).to_contain_text("PaymentDeclined")
            expect(page.locator("#btn-cancel")).to_be_disabled()
            page.screenshot(path=shots / "compensated.png", full_page=True)

            # A signal sent from the page completes the workflow that waits for it.
            open_workflow(page, url, waiting_for_signal)
            expect(page.locator("#wf-status")).to_have_text("RUNNING")
            expect(page.locator("#btn-resume")).to_be_disabled()
            page.click("#btn-signal")
            page.fill("#signal-name", "approve")
            # Markup in data is shown as text, never parsed.
            page.fill("#signal-payload", '{"by": "the ui test <b>in bold?</b>"}')
            with page.expect_request(lambda r: "/signal?" in r.url) as sending:
                page.click("#signal-send")
            # The page names the signal (so a resend is applied once); the server keeps it.
            signal_id = json.loads(sending.value.post_data or "{}")["signal_id"]
            assert uuid.UUID(signal_id).version == 4, signal_id
            expect(page.locator("#action-message.ok")).to_contain_text(
                f"sent signal 'approve' to workflow {waiting_for_signal} (signal id {signal_id})"
            )
            expect(page.locator("#wf-status")).to_have_text("COMPLETED")
            received = timeline.locator('li[data-kind="SignalReceived"]')
            expect(received).to_contain_text("signal approve received")
            expect(received).to_contain_text("the ui test <b>in bold?</b>")
            expect(page.locator("#detail-view b")).to_have_count(0)
            expect(page.locator("#wf-payloads")).to_contain_text("the ui test")
            page.screenshot(path=shots / "signalled.png", full_page=True)

            # A cancel from the page: the workflow holding two reservations releases both,
            # newest first, and ends CANCELLED.
            open_workflow(page, url, holding_stock)
            reserved = timeline.locator('li.step[data-step="activity"][data-outcome="completed"]')
            expect(reserved).to_have_count(2)
            expect(page.locator("#wf-status")).to_have_text("RUNNING")
            page.click("#btn-cancel")
            page.fill("#cancel-reason", "customer called, from the UI")
            page.click("#cancel-confirm")
            expect(page.locator("#action-message.ok")).to_contain_text("to cancel")
            expect(page.locator("#wf-status")).to_have_text("CANCELLED")
            expect(timeline.locator('li[data-kind="CancelRequested"]')).to_contain_text(
                "customer called, from the UI"
            )
            released = timeline.locator('li.step[data-step="compensation"]')
            expect(released).to_have_count(2)
            for index in range(2):
                expect(released.nth(index)).to_contain_text("inventory.release")
                expect(released.nth(index)).to_have_attribute("data-outcome", "completed")
            expect(timeline.locator('li[data-kind="closed"]')).to_contain_text("CANCELLED")
            page.screenshot(path=shots / "cancelled.png", full_page=True)

            # A STUCK workflow shows why, and Resume asks the orchestrators to re-drive it
            # (its type is still not deployed, so it stays STUCK).
            status, answer = get_json(f"{url}api/workflow?id={quote(stuck, safe='')}")
            assert (status, answer["workflow"]["workflow_id"]) == (200, stuck), answer
            open_workflow(page, url, stuck)
            expect(page.locator("#wf-status")).to_have_text("STUCK")
            expect(page.locator("#wf-problem")).to_contain_text("UnknownWorkflowType")
            expect(page.locator("#btn-resume")).to_be_enabled()
            page.click("#btn-resume")
            expect(page.locator("#action-message.ok")).to_contain_text("resume")
            expect(page.locator("#wf-status")).to_have_text("STUCK")

            # Back on the list, the counts show what the actions did.
            page.goto(url)
            expect(count_of("CANCELLED")).to_have_text("1")
            expect(count_of("COMPLETED")).to_have_text("5")
            expect(count_of("RUNNING")).to_have_text("0")
            page.screenshot(path=shots / "list-after.png", full_page=True)
            assert not errors, f"the page raised: {errors}"
        finally:
            page.screenshot(path=shots / "last.png", full_page=True)
            browser.close()
    # The screenshot: a timeline with a cancel from the UI and its compensations.
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shots / "cancelled.png", ARTIFACTS / "ui.png")
    if os.environ.get("SAGALINE_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(shots / "cancelled.png", SCREENSHOT)
