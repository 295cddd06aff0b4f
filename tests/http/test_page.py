# -*- test-case-name: tests.http.test_page -*-
"""
The browser upload page (L{imgresume.http._page}, C{--upload-page}): its
three files at C{/} of the tus site under a strict Content-Security-Policy,
nothing there without the option, nothing in the page that the policy
would block (inline code or style), and the script's syntax under Node.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources

from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from imgresume.http._page import CSP
from imgresume.server import make_server_service
from imgresume.storage.memory import MemoryStorage
from tests.support.http import TusServer
from tests.support.options import server_options


def page_file(name: str) -> str:
    return resources.files("imgresume.http").joinpath("page", name).read_text("utf-8")


class PageTests(SynchronousTestCase):
    """GET / and its script and style, with --upload-page."""

    def setUp(self) -> None:
        self.wire = TusServer(upload_page=True).wire()

    def get(self, path: str, method: str = "GET"):
        answer = self.wire.request(method, path, tus=False)
        assert answer is not None
        return answer

    def test_page(self) -> None:
        """/ is the page, served with the strict policy and no sniffing."""
        answer = self.get("/")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer["Content-Type"], "text/html; charset=utf-8")
        self.assertEqual(answer["Content-Security-Policy"], CSP)
        self.assertEqual(answer["X-Content-Type-Options"], "nosniff")
        self.assertEqual(answer["Referrer-Policy"], "no-referrer")
        self.assertEqual(answer.body.decode(), page_file("index.html"))
        self.assertIn(b'<script src="upload.js"', answer.body)

    def test_script_and_style(self) -> None:
        """The script and the style, each with its type and the policy."""
        for path, kind, name in (("/upload.js", "text/javascript", "upload.js"),
                                 ("/upload.css", "text/css", "upload.css")):
            answer = self.get(path)
            self.assertEqual(answer.status, 200)
            self.assertEqual(answer["Content-Type"], kind + "; charset=utf-8")
            self.assertEqual(answer["Content-Security-Policy"], CSP)
            self.assertEqual(answer.body.decode(), page_file(name))

    def test_head(self) -> None:
        """HEAD / answers the headers of GET without the body."""
        answer = self.get("/", "HEAD")
        self.assertEqual(answer.status, 200)
        self.assertEqual(answer["Content-Security-Policy"], CSP)

    def test_elsewhere(self) -> None:
        """Other paths stay 404, and a page file is not a folder."""
        for path in ("/index.html", "/upload.js/x", "/page/upload.js", "/x"):
            self.assertEqual(self.get(path).status, 404, path)

    def test_files_still_tus(self) -> None:
        """/files/ is still the tus endpoint beside the page."""
        answer = self.wire.request("OPTIONS", "/files/", tus=False)
        self.assertEqual(answer.status, 204)
        self.assertEqual(answer["Tus-Version"], "1.0.0")

    def test_off_by_default(self) -> None:
        """Without the page, / is a plain 404 naming /files/."""
        answer = TusServer().wire().request("GET", "/", tus=False)
        self.assertEqual(answer.status, 404)
        self.assertIn(b"/files/", answer.body)
        self.assertIsNone(answer.get("Content-Security-Policy"))


class PolicyTests(SynchronousTestCase):
    """Nothing in the page needs what the policy forbids."""

    def test_policy(self) -> None:
        """Only this origin: no inline script or style, no other hosts, no eval."""
        self.assertIn("default-src 'none'", CSP)
        self.assertIn("script-src 'self';", CSP)
        self.assertNotIn("unsafe", CSP)
        self.assertNotIn("*", CSP)

    def test_no_inline_code(self) -> None:
        """index.html has no inline script, style or event handler attribute."""
        html = page_file("index.html")
        for script in re.findall(r"<script[^>]*>", html):
            self.assertIn("src=", script)
        self.assertNotRegex(html, r"<script[^>]*>\s*\S+\s*</script>")
        self.assertNotIn("<style", html)
        self.assertNotRegex(html, r"\sstyle=")
        self.assertNotRegex(html, r"\son[a-z]+=")
        self.assertNotRegex(html, r"https?://")

    def test_script(self) -> None:
        """The script uses no eval-like call and speaks tus 1.0.0 at files/."""
        js = page_file("upload.js")
        for forbidden in ("eval(", "new Function", "document.write"):
            self.assertNotIn(forbidden, js)
        self.assertIn("'Tus-Resumable', '1.0.0'", js)
        self.assertIn("new URL('files/', document.baseURI)", js)

    def test_script_syntax(self) -> None:
        """node --check parses the script (where Node is installed)."""
        node = shutil.which("node")
        if node is None:
            raise SkipTest("node is not installed")
        path = resources.files("imgresume.http").joinpath("page", "upload.js")
        out = subprocess.run([node, "--check", str(path)], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)


class OptionTests(SynchronousTestCase):
    """--upload-page on the command line and in make_server_service."""

    def test_option(self) -> None:
        """--upload-page is a flag, off by default, and needs --http."""
        self.assertFalse(server_options(self)["upload-page"])
        options = server_options(self, "--http", "tcp:8080:interface=127.0.0.1",
                                 "--upload-page")
        self.assertTrue(options["upload-page"])
        with self.assertRaises(usage.UsageError) as caught:
            server_options(self, "--upload-page")
        self.assertIn("--http", str(caught.exception))

    def test_service(self) -> None:
        """make_server_service(http_upload_page=True) serves the page at /."""
        for on in (True, False):
            top = make_server_service(
                "tcp:0:interface=127.0.0.1", MemoryStorage(), reactor=MemoryReactorClock(),
                http_listen="tcp:0:interface=127.0.0.1", gc_interval=0,
                http_upload_page=on)
            root = top.http.listener.factory.resource
            self.assertEqual(set(root.page), {b"", b"upload.js", b"upload.css"} if on else set())
