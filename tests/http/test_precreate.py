# -*- test-case-name: tests.http.test_precreate -*-
"""
The tus pre-create hook (L{imgresume.http.PreCreateHook}): real commands
and a real local URL accept or refuse creations from what the request
carries; a hook that fails or does not answer in time never accepts.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from imgresume.http import PreCreateHook
from tests.support.http import TusServer, metadata
from tests.support.options import server_options


class _Answer(Resource):
    """A hook URL: records each JSON it is sent, answers a fixed status and text."""

    isLeaf = True

    def __init__(self, status: int, text: bytes) -> None:
        super().__init__()
        self.status, self.text, self.seen = status, text, []

    def render_POST(self, request):
        self.seen.append(json.loads(request.content.read()))
        request.setResponseCode(self.status)
        return self.text


class HookTestCase(TestCase):
    timeout = 30

    async def create(self, hook: PreCreateHook, **headers: str):
        """POST a creation to a server with C{hook}; its answer once it came."""
        server = TusServer(pre_create=hook)
        wire = server.wire()
        wire.request("POST", "/files/", {
            "Upload-Length": "5", "Upload-Metadata": metadata(filename="a.tif"),
            **headers})
        for _ in range(300):
            if wire.answers():
                break
            await deferLater(reactor, 0.02, lambda: None)
        [answer] = wire.answers()
        self.server = server
        return answer

    def command(self, code: str) -> list[str]:
        script = os.path.join(self.mktemp() + ".py")
        with open(script, "w") as f:
            f.write(code)
        return [sys.executable, script]


class CommandTests(HookTestCase):
    """A hook command: exit 0 accepts, anything else refuses."""

    async def test_accepts_from_the_request(self) -> None:
        """
        The command reads the request's JSON (size, name, metadata, headers
        such as a session cookie) and accepts: 201.
        """
        out = self.mktemp()
        hook = PreCreateHook(reactor, command=self.command(
            "import json, sys\n"
            "d = json.load(sys.stdin)\n"
            f"open({out!r}, 'w').write(json.dumps(d))\n"
            "sys.exit(0 if d['headers'].get('cookie') == 'session=good' else 1)\n"))
        answer = await self.create(hook, Cookie="session=good")
        self.assertEqual(answer.status, 201)
        with open(out) as f:
            seen = json.load(f)
        self.assertEqual(seen["event"], "tus.pre-create")
        self.assertEqual((seen["size"], seen["name"], seen["client_id"]),
                         (5, "a.tif", "anonymous"))
        self.assertEqual(seen["metadata"], {"filename": "a.tif"})
        self.assertEqual(seen["remote"], "127.0.0.1")

    async def test_refuses(self) -> None:
        """A non-zero exit: 403 with the first line it printed; nothing created."""
        hook = PreCreateHook(reactor, command=self.command(
            "import sys\nprint('no session: log in first')\nsys.exit(3)\n"))
        answer = await self.create(hook)
        self.assertEqual(answer.status, 403)
        self.assertEqual(answer.body, b"no session: log in first\n")
        self.assertEqual(self.server.storage._uploads, {})

    async def test_timeout(self) -> None:
        """A hook that does not answer in time: 503 with Retry-After, never an acceptance."""
        hook = PreCreateHook(reactor, command=self.command("import time\ntime.sleep(20)\n"),
                             timeout=0.5)
        self.addCleanup(hook.idle)  # the killed command reaped before the test ends
        answer = await self.create(hook)
        self.assertEqual(answer.status, 503)
        self.assertEqual(answer["Retry-After"], "5")
        self.assertEqual(self.server.storage._uploads, {})


class URLTests(HookTestCase):
    """A hook URL: 2xx accepts, 4xx refuses, anything else is unavailable."""

    def serve(self, status: int, text: bytes = b"") -> tuple[str, _Answer]:
        resource = _Answer(status, text)
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/hook", resource

    async def test_accepts(self) -> None:
        """200: created; the URL was sent the request's JSON."""
        url, resource = self.serve(200)
        answer = await self.create(PreCreateHook(reactor, url=url), Origin="https://a.example")
        self.assertEqual(answer.status, 201)
        self.assertEqual(resource.seen[0]["headers"]["origin"], "https://a.example")

    async def test_refuses(self) -> None:
        """A 4xx: 403 with the first line of its body."""
        url, _ = self.serve(401, b"token expired\nmore")
        answer = await self.create(PreCreateHook(reactor, url=url))
        self.assertEqual((answer.status, answer.body), (403, b"token expired\n"))

    async def test_fails(self) -> None:
        """A 5xx, or nothing listening: 503."""
        url, _ = self.serve(500)
        self.assertEqual((await self.create(PreCreateHook(reactor, url=url))).status, 503)
        self.assertEqual((await self.create(PreCreateHook(
            reactor, url="http://127.0.0.1:1/hook"))).status, 503)


class KeysTests(HookTestCase):
    """The hook never sees the server's own bearer key."""

    async def test_authorization_withheld(self) -> None:
        """With --keys, Authorization (the key) is not among the headers the hook gets."""
        from tests.http.test_resource import _Keys

        url, resource = self.serve_ok()
        key = bytes(32)
        server = TusServer(pre_create=PreCreateHook(reactor, url=url),
                           keys=_Keys({"alice": key}))
        wire = server.wire()
        wire.request("POST", "/files/", {"Upload-Length": "1", "X-App-Token": "t1",
                                         "Authorization": f"Bearer alice:{key.hex()}"})
        for _ in range(300):
            if wire.answers():
                break
            await deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(wire.answers()[0].status, 201)
        headers = resource.seen[0]["headers"]
        self.assertEqual(headers["x-app-token"], "t1")
        self.assertNotIn("authorization", headers)
        self.assertEqual(resource.seen[0]["client_id"], "alice")

    def serve_ok(self) -> tuple[str, _Answer]:
        resource = _Answer(204, b"")
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}/", resource


class OptionsTests(SynchronousTestCase):
    """--http-pre-create and --http-pre-create-timeout."""

    def test_command_and_url(self) -> None:
        """A command line is split; an http(s) URL kept; the timeout parsed."""
        http = ("--http", "tcp:8080:interface=127.0.0.1")
        options = server_options(self, *http, "--http-pre-create",
                                 f"{sys.executable} check.py --strict",
                                 "--http-pre-create-timeout", "3s")
        self.assertEqual(options["http-pre-create"]["command"][1:], ("check.py", "--strict"))
        self.assertEqual(options["http-pre-create"]["timeout"], 3.0)
        with self.assertRaises(usage.UsageError):  # a program that is not there
            server_options(self, *http, "--http-pre-create", "/nonexistent/hook")
        options = server_options(self, *http, "--http-pre-create", "https://app/hook")
        self.assertEqual(options["http-pre-create"], {"url": "https://app/hook",
                                                      "timeout": 10.0})

    def test_bad(self) -> None:
        """Without --http, with a bad timeout: refused."""
        with self.assertRaises(usage.UsageError):
            server_options(self, "--http-pre-create", sys.executable)
        with self.assertRaises(usage.UsageError):
            server_options(self, "--http", "tcp:8080:interface=127.0.0.1",
                           "--http-pre-create", sys.executable,
                           "--http-pre-create-timeout", "0")

    def test_one_kind(self) -> None:
        """A hook is a command or a URL, not both nor neither."""
        with self.assertRaises(ValueError):
            PreCreateHook(reactor)
        with self.assertRaises(ValueError):
            PreCreateHook(reactor, command=["x"], url="http://x/")
