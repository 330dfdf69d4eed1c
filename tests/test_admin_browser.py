"""The status page in a real browser: Debian's chromium driven by selenium through Debian's
chromedriver (never a downloaded browser), against gunicorn, the emulator and `receiver worker`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import requests

from .conftest import ROOT, make_receiver_env, read_manifest, wait_for

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

TOKEN = "browser-admin-token-" + "y" * 12
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)), reason="chromium and chromedriver (.ci/run installs them)"
)


@pytest.fixture
def receiver_env(tmp_path: Path, emulator) -> dict[str, str]:
    return make_receiver_env(
        tmp_path, emulator.url, RECEIVER_ADMIN_TOKEN=TOKEN, RECEIVER_MAX_ATTEMPTS="1", RECEIVER_POLL_SECONDS="1"
    )


@pytest.fixture
def browser(tmp_path: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument("--window-size=1100,1400")
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_operator_logs_in_sees_batches_and_retries_a_dead_one(emulator, web, worker, secret, browser, tmp_path):
    good = emulator.create_batch(items=40, status="processing")["id"]
    bad = emulator.create_batch(items=30, status="processing")["id"]
    emulator.fault(batch_id=bad, target="api", kind="500", count=3)
    emulator.complete(good)
    emulator.complete(bad)
    wait_for(lambda: read_manifest(tmp_path / "storage", good), what="good batch stored")
    wait_for(lambda: _job_state(web.url, bad) == "dead", what="bad batch dead")

    # Without credentials the browser gets the 401 challenge, not the page.
    browser.get(f"{web.url}/admin")
    assert "Overview" not in browser.page_source

    # Basic credentials in the URL: the browser's way of answering the challenge in a test.
    base = web.url.replace("http://", f"http://ops:{TOKEN}@")
    browser.get(f"{base}/admin")
    assert browser.find_element(By.TAG_NAME, "h1").text == "Overview"
    assert browser.find_element(By.CSS_SELECTOR, "#dead-count .value").text == "1"
    assert browser.find_element(By.CSS_SELECTOR, "#stored-count .value").text == "1"
    assert browser.find_element(By.CSS_SELECTOR, "#ready-ledger .value").text == "ready"
    assert bad in browser.find_element(By.ID, "dead").text
    browser.save_screenshot(str(tmp_path / "admin-overview.png"))
    if os.environ.get("RECEIVER_UPDATE_SCREENSHOT"):  # docs/admin.png, refreshed on purpose only
        browser.save_screenshot(str(ROOT / "docs" / "admin.png"))

    # The stored batch's page shows its manifest and where it lives.
    browser.get(f"{base}/admin/jobs?state=stored")
    browser.find_element(By.LINK_TEXT, good).click()
    assert browser.find_element(By.ID, "job-state").text == "stored"
    assert "results/dt=" in browser.find_element(By.ID, "files").text

    # Retry the dead one from the overview; the page says so, and the worker stores it.
    browser.get(f"{base}/admin")
    browser.find_element(By.ID, f"retry-{bad}").click()
    # The click submits a form: wait for the page it leads to rather than read the old one.
    wait_for(lambda: "Queued again" in browser.page_source, timeout=15, what="the retried job's page")
    wait_for(lambda: read_manifest(tmp_path / "storage", bad), what="retried batch stored")

    def shows_stored() -> bool:
        browser.get(f"{base}/admin/jobs/{bad}")
        return browser.find_element(By.ID, "job-state").text == "stored"

    wait_for(shows_stored, timeout=30, what="the page shows the retried batch stored")

    # A form posted without its CSRF token (a hostile page's) is refused, even with credentials.
    browser.get(f"{base}/admin/jobs/{bad}")
    browser.execute_script(
        "var f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
        "document.body.appendChild(f); f.submit();",
        f"{web.url}/admin/jobs/{bad}/retry",
    )
    wait_for(lambda: "CSRF" in browser.page_source, timeout=10, what="the CSRF refusal")
    assert _job_state(web.url, bad) == "stored"

    # Watch a batch no delivery ever names: it ends without a terminal delivery, and polling stores it.
    silent = emulator.create_batch(items=20, status="processing")["id"]
    browser.get(f"{base}/admin")
    browser.find_element(By.ID, "watch-batch-id").send_keys(silent)
    browser.find_element(By.ID, "watch-submit").click()
    wait_for(lambda: 'id="watched-notice"' in browser.page_source, timeout=15, what="the overview after Watch")
    assert "Watched" in browser.find_element(By.ID, "watched-notice").text
    assert browser.find_element(By.CSS_SELECTOR, "#watched-count .value").text == "1"
    emulator.complete(silent, deliver=False)
    wait_for(lambda: read_manifest(tmp_path / "storage", silent), what="the watched batch stored by polling")
    assert (tmp_path / "admin-overview.png").stat().st_size > 10_000


def _job_state(url: str, batch_id: str) -> str | None:
    r = requests.get(f"{url}/admin/jobs/{batch_id}", auth=("ops", TOKEN), timeout=10)
    if r.status_code != 200:
        return None
    import re

    found = re.search(r'id="job-state">([a-z]+)<', r.text)
    return found.group(1) if found else None
