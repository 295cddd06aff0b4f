# -*- test-case-name: tests.http.test_page -*-
"""
The browser upload page (C{--upload-page}): C{/} of the HTTP endpoint,
its script C{/upload.js} and style C{/upload.css}, plain files shipped in
C{imgresume/http/page/} (package data) and served under a strict
Content-Security-Policy: the page runs only its own script and talks
only to its own origin.
"""

from __future__ import annotations

from importlib import resources

from twisted.web.resource import Resource
from twisted.web.server import Request

#: Only this origin's script, style and requests; no inline code, no
#: frames, no forms, no plugins.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

#: Path segment under C{/} -> (file in C{page/}, its Content-Type).
FILES = {
    b"": ("index.html", "text/html; charset=utf-8"),
    b"upload.js": ("upload.js", "text/javascript; charset=utf-8"),
    b"upload.css": ("upload.css", "text/css; charset=utf-8"),
}


class PageFile(Resource):
    """
    One file of the page, read once when the site is built.  Built by
    L{page_children} for the L{imgresume.http.TusSite}'s root; rendered by
    C{twisted.web} for C{GET} and C{HEAD}.
    """

    isLeaf = True

    def __init__(self, name: str, content_type: str) -> None:
        super().__init__()
        self.body = resources.files("imgresume.http").joinpath("page", name).read_bytes()
        self.content_type = content_type

    def render_GET(self, request: Request) -> bytes:
        request.setHeader("Content-Type", self.content_type)
        request.setHeader("Content-Security-Policy", CSP)
        request.setHeader("X-Content-Type-Options", "nosniff")
        request.setHeader("Referrer-Policy", "no-referrer")
        request.setHeader("Cross-Origin-Opener-Policy", "same-origin")
        request.setHeader("Cache-Control", "no-cache")
        return self.body


def page_children() -> dict[bytes, Resource]:
    """The page's files by their path segment under C{/}."""
    return {segment: PageFile(name, kind) for segment, (name, kind) in FILES.items()}
