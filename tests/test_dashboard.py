"""The dashboard in a real headless browser (Debian's chromium with chromium-driver, selenium).

The page is loaded from a real daemon's metrics listener: it shows a volume the test made,
updates when a preserve happens behind its back, refuses an action without the control token
(and nothing changes), and performs it once the token is given; its backups panel shows the
backups the test makes in a repository given with ``owm serve --backup-repo``, each with its
label, and an encrypted repository without its key as locked. The browser tests are skipped
when the browser is not installed, except in CI (``CI`` set), where they must run; the API and
start-up checks of ``--backup-repo`` run everywhere.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, run_owm, start_daemon

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
needs_browser = pytest.mark.skipif(MISSING, reason="chromium, chromium-driver or selenium missing")

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


@needs_browser
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
    if shot and not os.path.exists(shot):  # (the backups test below makes docs/dashboard.png)
        browser.save_screenshot(shot)


# ------------------------------------------------------------------ backups of a repository


@pytest.fixture
def repos(short_tmp: Path) -> dict[str, Path]:
    """A plain repository and one encrypted with a key file (whose key the daemon is not given)."""
    plain, encrypted, key = short_tmp / "repo", short_tmp / "vault", short_tmp / "vault.key"
    key.write_text("k" * 48 + "\n")
    for args in (("repo", "init", plain), ("repo", "init", encrypted, "--encrypt", "--key-file",
                                            key)):
        done = run_owm(*args)
        assert done.returncode == 0, done.stderr
    return {"plain": plain, "encrypted": encrypted, "key": key}


@pytest.fixture
def repo_daemon(short_tmp: Path, repos: dict[str, Path]) -> Iterator[Daemon]:
    d = start_daemon(short_tmp / "pool", "--metrics-listen", "127.0.0.1:0",
                     "--backup-repo", repos["plain"], "--backup-repo", repos["encrypted"])
    try:
        yield d
    finally:
        code = d.stop()
    assert code == 0, d.log_text()


def _backup(d: Daemon, image: str, repo: Path, *extra: str | Path) -> str:
    done = d.owm("backup", image, "--to", repo, "--json", *extra)
    assert done.returncode == 0, done.stderr
    import json

    backup_id: str = json.loads(done.stdout)["id"]
    return backup_id


def _clean_and_unclean_backups(d: Daemon, repo: Path, hold_session: Any) -> tuple[str, str]:
    """bank@0 drained cleanly and backed up; bank@1 drained-unclean, backed up with --force."""
    assert d.owm("volume", "create", "bank", "--size", "4M").returncode == 0
    holder = hold_session(d, "bank")
    assert d.owm("preserve", "bank").stdout.strip() == "bank@0"
    holder.disconnect()
    clean = _backup(d, "bank@0", repo)
    holder = hold_session(d, "bank")
    assert d.owm("preserve", "bank").stdout.strip() == "bank@1"
    holder.kill()  # SIGKILL: the session ends without a clean disconnect
    assert d.owm("wait", "bank@1", "--timeout", "20").returncode == 0
    unclean = _backup(d, "bank@1", repo, "--force")
    return clean, unclean


def test_repo_api_pages_backups_with_their_labels(
    repo_daemon: Daemon, repos: dict[str, Path], hold_session: Any
) -> None:
    d = repo_daemon
    clean, unclean = _clean_and_unclean_backups(d, repos["plain"], hold_session)
    assert d.owm("backup", "bank@0", "--to", repos["encrypted"], "--key-file",
                 repos["key"]).returncode == 0

    status, answer = d.api("GET", "/v1/repos")
    assert status == 200
    plain, vault = answer["repos"]
    assert (plain["path"], plain["count"], plain["locked"]) == (str(repos["plain"]), 2, False)
    assert vault["encrypted"] and vault["locked"] and vault["count"] == 1
    assert vault["note"] == "encrypted, no key given"

    # Newest first, one at a time.
    status, first = d.api("GET", "/v1/repos/0/backups?limit=1")
    assert status == 200 and first["count"] == 2
    [row] = first["backups"]
    assert (row["id"], row["image"], row["label"]) == (unclean, "bank@1", "drained-unclean")
    assert row["incremental"] and row["parent"] == clean and row["verified"]
    status, second = d.api("GET", "/v1/repos/0/backups?limit=1&offset=1")
    [row] = second["backups"]
    assert (row["id"], row["label"], row["volume"], row["size"]) == (
        clean, "transaction-consistent", "bank", 4 << 20)
    assert row["preserved_at"] and row["stored_bytes"] is not None and not row["incremental"]
    status, past = d.api("GET", "/v1/repos/0/backups?offset=2")
    assert status == 200 and past["backups"] == []

    # The locked repository: its count, no rows, no error.
    status, locked = d.api("GET", "/v1/repos/1/backups")
    assert status == 200 and locked["locked"] and locked["backups"] == [] and locked["count"] == 1

    # What a user can get wrong is a 4xx with one sentence.
    for path, want in (("/v1/repos/2/backups", 404), ("/v1/repos/x/backups", 400),
                       ("/v1/repos/0/backups?limit=0", 400),
                       ("/v1/repos/0/backups?limit=501", 400),
                       ("/v1/repos/0/backups?offset=-1", 400)):
        status, body = d.api("GET", path)
        assert status == want and body["error"].count(".") <= 1, (path, status, body)

    # The metrics listener serves the same listing without a token (the dashboard reads it).
    import urllib.request

    with urllib.request.urlopen(f"http://{d.health['metrics']}/v1/repos/0/backups",
                                timeout=10) as reply:
        assert reply.status == 200


@pytest.mark.parametrize("case", ["missing", "not-a-repo", "useless-key", "key-alone"])
def test_serve_refuses_a_bad_backup_repo(short_tmp: Path, repos: dict[str, Path],
                                         case: str) -> None:
    args, code, says = {
        "missing": (["--backup-repo", short_tmp / "nowhere"], 1,
                    "there is no backup repository there"),
        "not-a-repo": (["--backup-repo", short_tmp], 1, "is not an owm backup repository"),
        "useless-key": (["--backup-repo", repos["plain"], "--backup-key-file", repos["key"]], 1,
                        "opens none of the --backup-repo repositories"),
        "key-alone": (["--backup-key-file", repos["key"]], 2, "needs --backup-repo"),
    }[case]
    done = run_owm("--pool", short_tmp / "pool", "serve", "--listen", "127.0.0.1:0",
                   *map(str, args), timeout=30)
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and says in done.stderr, lines
    assert case == "key-alone" or len(lines) == 1, lines
    assert not (short_tmp / "pool" / "control.sock").exists()


@needs_browser
def test_dashboard_shows_backups_of_a_repository(
    repo_daemon: Daemon, repos: dict[str, Path], browser: Any, hold_session: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = repo_daemon
    wait = WebDriverWait(browser, WAIT)
    browser.get(f"http://{d.health['metrics']}/")
    panel = wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, 'section.repo[data-repo="0"]')))
    assert "No backups yet" in panel.text
    locked = wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, 'section.repo[data-repo="1"] .note.locked')))
    assert "encrypted, no key given" in locked.text

    # Backups made while the page is open appear, each with its label.
    clean, unclean = _clean_and_unclean_backups(d, repos["plain"], hold_session)
    row = wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'section.repo[data-repo="0"] tr[data-backup="{unclean}"]')))
    assert row.get_attribute("data-label") == "drained-unclean"
    assert f"incremental of {clean}" in row.text
    row = browser.find_element(
        By.CSS_SELECTOR, f'section.repo[data-repo="0"] tr[data-backup="{clean}"]')
    assert row.get_attribute("data-label") == "transaction-consistent"
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[:3] == [clean, "bank", "bank@0"] and cells[4] == "transaction-consistent"
    assert cells[5] == "4.0M" and cells[7] == "full" and cells[8] == "checksummed"

    # The encrypted one still lists nothing, but counts what it holds.
    assert d.owm("backup", "bank@0", "--to", repos["encrypted"], "--key-file",
                 repos["key"]).returncode == 0
    wait.until(ec.text_to_be_present_in_element(
        (By.CSS_SELECTOR, 'section.repo[data-repo="1"] .note.locked'), ": 1 backup(s)"))
    wait.until(ec.presence_of_element_located(
        (By.CSS_SELECTOR, 'section.volume[data-volume="bank"] li.image[data-image="bank@1"]')))
    shot = os.environ.get("OWM_DASHBOARD_SCREENSHOT")
    if shot:  # how docs/dashboard.png is made
        browser.set_window_size(1200, 1000)
        browser.save_screenshot(shot)


def test_listing_pages_thousands_of_backups_reading_only_each_page(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,500 backups: pages of 500, newest first, each page reading only its own manifests."""
    import time

    import blake3

    from owm.backup.listing import RepoListing
    from owm.backup.manifest import COMPLETE, ChunkMap, Manifest, map_name
    from owm.backup.repo import Repository

    repo = Repository.open(short_tmp / "repo", create=True)
    packed, digest = ChunkMap(1).pack()
    ids = []
    for i in range(1500):  # written as Repository.save would, less its syncs (only the listing
        # reads them, and it never opens a chunk map)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(1_790_000_000 + i))
        backup_id = f"v@{i}-{stamp}"
        m = Manifest(id=backup_id, volume="v", image=f"v@{i}", generation=i, size=65536,
                     chunk_size=65536, state=COMPLETE, consistency="transaction-consistent",
                     started_at=stamp, map_file=map_name(backup_id, digest), map_blake3=digest,
                     map_file_blake3=blake3.blake3(packed).hexdigest())
        (repo.root / "backups" / f"{backup_id}.json").write_bytes(m.dumps())
        ids.append(backup_id)
    junk = "v@9999-20000101T000000Z"  # the oldest stamp: last; a manifest that is not one
    (repo.root / "backups" / f"{junk}.json").write_bytes(b"{not json")

    loads: list[str] = []
    real_load = Repository.load

    def counting_load(self: Repository, backup_id: str) -> Manifest:
        loads.append(backup_id)
        return real_load(self, backup_id)

    monkeypatch.setattr(Repository, "load", counting_load)
    listing = RepoListing.open([repo.root])
    assert listing.repositories()[0]["count"] == 1501
    seen: list[str] = []
    for offset in (0, 500, 1000, 1500):
        page = listing.backups(0, offset, 500)
        assert page["count"] == 1501
        seen += [row["id"] for row in page["backups"]]
    assert seen == [*reversed(ids), junk]
    assert len(loads) == 1501  # every manifest read once, by the page that shows it
    assert page["backups"][-1]["label"] == "damaged"
    loads.clear()
    page = listing.backups(0, 700, 10)
    assert [r["id"] for r in page["backups"]] == list(reversed(ids))[700:710] and len(loads) == 10
    assert {r["label"] for r in page["backups"]} == {"transaction-consistent"}


@pytest.mark.parametrize("image_state, consistency, forced, label", [
    ("drained", "transaction-consistent", False, "transaction-consistent"),
    ("drained", "crash-consistent", False, "crash-consistent"),  # drained after a cutover
    ("drained-unclean", "crash-consistent", True, "drained-unclean"),
    ("broken", "broken", True, "broken"),
    ("damaged", "crash-consistent", True, "damaged"),
    ("drained", "damaged", False, "damaged"),
    ("drained", "transaction-consistent", True, "crash-consistent"),  # forced: never more
    ("drained", "quantum-consistent", False, "unknown"),  # unknown to this owm: claim nothing
])
def test_backup_label_is_the_weakest_claim(image_state: str, consistency: str, forced: bool,
                                           label: str) -> None:
    from owm.backup.listing import backup_label
    from owm.backup.manifest import COMPLETE, Manifest

    m = Manifest(id="v@0-20260101T000000Z", volume="v", image="v@0", generation=0,
                 size=65536, chunk_size=65536, state=COMPLETE, consistency=consistency,
                 started_at="2026-01-01T00:00:00Z", image_state=image_state, forced=forced)
    assert backup_label(m) == label
