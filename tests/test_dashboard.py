"""The dashboard in a real headless browser (Debian's chromium with chromium-driver, selenium).

The page is loaded from a real daemon's metrics listener: it shows a volume the test made,
updates when a preserve happens behind its back, refuses an action without the control token
(and nothing changes), and performs it once the token is given. Skipped when the browser is
not installed, except in CI (``CI`` set), where it must run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, start_daemon

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

MISSING = not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM)
if MISSING and os.environ.get("CI"):
    pytest.fail("the dashboard test needs chromium, chromium-driver and selenium in CI "
                "(scripts/setup installs them)", pytrace=False)
pytestmark = pytest.mark.skipif(MISSING, reason="chromium, chromium-driver or selenium missing")

WAIT = 20.0
TOKEN = "dashboard-test-token"


@pytest.fixture
def browser(short_tmp: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,800", f"--user-data-dir={short_tmp / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def dash_daemon(short_tmp: Path) -> Iterator[Daemon]:
    token_file = short_tmp / "token"
    token_file.write_text(TOKEN + "\n")
    d = start_daemon(short_tmp / "pool", "--metrics-listen", "127.0.0.1:0",
                     "--control-token-file", token_file)
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, d.log_text()


def test_dashboard_shows_updates_and_guards_actions(
    dash_daemon: Daemon, browser: Any, hold_session: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = dash_daemon
    wait = WebDriverWait(browser, WAIT)
    assert d.owm("volume", "create", "bank", "--size", "8M").returncode == 0
    holder = hold_session(d, "bank")  # keeps bank@0 draining

    browser.get(f"http://{d.health['metrics']}/")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, 'section[data-volume="bank"]')))
    assert "read-only" in browser.find_element(By.ID, "daemon").text

    # A preserve made elsewhere shows up: the image, draining, with its session.
    assert d.owm("preserve", "bank").stdout.strip() == "bank@0"
    row = wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, 'li.image[data-image="bank@0"][data-state="draining"]')))
    assert "1 session(s) holding it" in row.text
    assert browser.find_elements(By.CSS_SELECTOR, '.timeline .seg[data-image="bank@0"]')

    # Without the token the page's preserve is refused, and nothing was preserved.
    browser.find_element(By.CSS_SELECTOR, 'button.preserve[data-volume="bank"]').click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "control token"))
    status, volume = d.api("GET", "/v1/volumes/bank")
    assert status == 200 and [i["name"] for i in volume["images"]] == ["bank@0"]

    # With it, the same button preserves, and the page shows the new image.
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "token-save").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "daemon"), "actions enabled"))
    browser.find_element(By.CSS_SELECTOR, 'button.preserve[data-volume="bank"]').click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, 'li.image[data-image="bank@1"]')))
    status, volume = d.api("GET", "/v1/volumes/bank")
    assert [i["name"] for i in volume["images"]] == ["bank@0", "bank@1"]

    holder.disconnect()
    wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, 'li.image[data-image="bank@0"][data-state="drained"]')))
    shot = os.environ.get("OWM_DASHBOARD_SCREENSHOT")
    if shot:  # how docs/dashboard.png is made
        browser.save_screenshot(shot)
