# -*- test-case-name: tests.system.test_browser -*-
"""
The browser upload page (C{--upload-page}, C{docs/http.md}) in a real
headless Chromium (Debian's C{chromium} and C{chromium-driver}, driven by
Selenium), served by one of three C{twistd imgresume --http --upload-page}
servers behind C{twistd imgresume-lb}: the server holding the upload is
SIGKILLed mid-PATCH and the page finishes on another; a reload mid-upload
continues the same upload (HEAD, then PATCH) from the URL kept in
C{localStorage}.  The browser's upload bandwidth is throttled (DevTools
network conditions) so that a few MiB take seconds.  The
stored file is byte-identical.

Skipped, saying why, without Chromium, its driver or Selenium; with
C{IMGRESUME_REQUIRE_CHROMIUM=1} (as in CI) their absence is a failure.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.cluster import sha256_file, write_random
from tests.support.tus import TusCluster, kill_serving_when, stored_bytes

MiB = 1 << 20

REQUIRED = os.environ.get("IMGRESUME_REQUIRE_CHROMIUM") == "1"

#: Upload bandwidth the browser is held to, so that a few MiB take seconds.
THROTTLE = 2 * MiB


def _browser_paths() -> tuple[str, str] | str:
    """Chromium and its driver, or why the test cannot run."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
    if chromium is None or driver is None:
        return "chromium and chromium-driver are not installed (Debian: apt-get install " \
               "chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return chromium, driver


def browser(test: TestCase):
    """A headless Chromium under Selenium, quit at the test's end."""
    found = _browser_paths()
    if isinstance(found, str):
        if REQUIRED:
            test.fail(found + ", and IMGRESUME_REQUIRE_CHROMIUM=1 requires them.")
        raise SkipTest(found)
    chromium, driver_path = found
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    test.addCleanup(driver.quit)
    driver.set_page_load_timeout(30)
    return driver


class BrowserPageTests(TestCase):
    """The page in headless Chromium, through the balancer, with failures."""

    timeout = 240

    def start(self) -> TusCluster:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        cluster = TusCluster(self.work, servers=3, server_args=("--upload-page",)).start()
        self.addCleanup(cluster.stop)
        self.cluster = cluster
        return cluster

    def page(self, driver, path: str) -> None:
        """Open the page through the balancer, slow the uploads, choose C{path}."""
        from selenium.webdriver.common.by import By

        driver.get(f"http://127.0.0.1:{self.cluster.lb_port}/")
        driver.set_network_conditions(offline=False, latency=1,
                                      download_throughput=64 * MiB,
                                      upload_throughput=THROTTLE)
        driver.find_element(By.ID, "pick").send_keys(path)

    def row(self, driver) -> dict:
        """The one upload row's state, offset, URL and status text."""
        return driver.execute_script("""
            const li = document.querySelector('#uploads li')
            return li && {state: li.dataset.state, offset: li.dataset.offset || '0',
                          url: li.dataset.url || '',
                          status: li.querySelector('.status').textContent}""")

    def wait_done(self, driver, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        row = None
        while time.monotonic() < deadline:
            row = self.row(driver)
            if row and row["state"] in ("done", "failed"):
                return row
            time.sleep(0.2)
        raise AssertionError(f"the page never finished: {row}\n{self.cluster.logs()}")

    def kept_urls(self, driver) -> list[str]:
        """The upload URLs the page keeps in localStorage."""
        return driver.execute_script("""
            const urls = []
            for (let i = 0; i < localStorage.length; i++) {
              const key = localStorage.key(i)
              if (key.startsWith('imgresume-tus:'))
                urls.push(JSON.parse(localStorage.getItem(key)).url)
            }
            return urls""")

    async def test_sigkill_serving_server(self) -> None:
        """
        The server holding the upload is SIGKILLed mid-PATCH: the page
        finishes the upload on another server from the proven offset (here
        Chromium itself sends the cut PATCH again, as it does for a request
        cut on a reused connection; the server answers 409 with the proven
        offset before that body's end, and the page continues from there;
        a failure it sees goes through HEAD instead); the stored file is
        byte-identical and checked against the page's Repr-Digest.
        """
        self.start()
        size = 6 * MiB + 12345
        path = os.path.join(self.work, "page-scan.tif")
        digest = write_random(path, size)

        def run() -> tuple[dict, list[str]]:
            driver = browser(self)
            self.page(driver, path)
            killed = [kill_serving_when(self.cluster, size // 3)]
            return self.wait_done(driver), killed

        row, killed = await deferToThread(run)
        self.assertEqual(row["state"], "done", f"{row}\n{self.cluster.logs()}")
        self.assertEqual(len(killed), 1)
        self.assertIn("SHA-256 checked by the server", row["status"])
        self.assertEqual(sha256_file(
            os.path.join(self.cluster.storage, "complete", "page-scan.tif")), digest)
        self.assertEqual(self.cluster.procs[killed[0]].poll(), -9)

    async def test_reload_continues(self) -> None:
        """
        The page is reloaded mid-upload and the same file chosen again: the
        page continues the same upload (its URL from localStorage) from the
        server's offset, and forgets it once done.
        """
        self.start()
        size = 6 * MiB + 7
        path = os.path.join(self.work, "reloaded.tif")
        digest = write_random(path, size)

        def run() -> tuple[list[str], str, dict, list[str]]:
            driver = browser(self)
            self.page(driver, path)
            deadline = time.monotonic() + 60
            while stored_bytes(self.cluster.storage) < size // 3:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no progress: {self.row(driver)}")
                time.sleep(0.01)
            before = self.kept_urls(driver)
            driver.refresh()
            earlier = driver.execute_script(
                "return document.getElementById('earlier-list').textContent")
            from selenium.webdriver.common.by import By

            driver.find_element(By.ID, "pick").send_keys(path)
            row = self.wait_done(driver)
            return before, earlier, row, self.kept_urls(driver)

        before, earlier, row, after = await deferToThread(run)
        self.assertEqual(len(before), 1, before)
        self.assertIn("reloaded.tif", earlier)
        self.assertEqual(row["state"], "done", f"{row}\n{self.cluster.logs()}")
        self.assertEqual(row["url"], before[0])
        self.assertEqual(after, [])
        heads = [line for name in ("node-1", "node-2", "node-3")
                 for line in open(self.cluster.log(name)) if "tus HEAD /files/" in line]
        self.assertTrue(heads, "the page never asked HEAD where the upload stood")
        self.assertEqual(sha256_file(
            os.path.join(self.cluster.storage, "complete", "reloaded.tif")), digest)
