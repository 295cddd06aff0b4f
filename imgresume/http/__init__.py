# -*- test-case-name: tests.http.test_resource -*-
"""
The HTTP front door: tus 1.0.0 at C{/files/} over the server's storage,
served by C{twistd imgresume --http ENDPOINT} beside the native protocol
(C{docs/http.md}).  A Twisted adapter, beside L{imgresume.server}: it sees
storage only through L{imgresume.storage.interfaces}; the wiring
(L{imgresume.server}) builds it with L{tus_site}.

The private modules hold one concern each:

  - C{_headers}: the tus headers parsed without I/O (values or L{TusError});
  - C{_errors}: the HTTP status of each imgresume error;
  - C{_body}: one request body streamed into its upload, with back-pressure;
  - C{_defer}: a PATCH's C{Upload-Length} declaring a deferred length;
  - C{_precreate}: the pre-create hook (a command or URL that accepts or
    refuses each creation);
  - C{_uploads}: the storage side (create, resume, verify and publish,
    HEAD, DELETE, identities, takeover of silent requests);
  - C{_resource}: the C{twisted.web} request, resource and site;
  - C{_page}: the browser upload page at C{/} (C{--upload-page}), its
    files in C{page/}.
"""

from __future__ import annotations

from typing import Any

from imgresume.http._headers import EXTENSIONS, TUS_VERSION, TusError
from imgresume.http._page import page_children
from imgresume.http._precreate import PreCreateHook
from imgresume.http._resource import FilesResource, TusChannel, TusRequest, TusSite
from imgresume.http._uploads import ANONYMOUS, TusUploads


def tus_site(uploads: TusUploads, *, timeout: float = 300.0, reactor: Any = None,
             upload_page: bool = False, **limits: Any) -> TusSite:
    """
    The C{twisted.web} site serving tus at C{/files/} over C{uploads}.

    @param timeout: seconds a connection may stay silent (mid-body too).
    @param reactor: the reactor of its connections' timeouts (the global one
        by default).
    @param upload_page: also serve the browser upload page at C{/}
        (C{--upload-page}).
    @param limits: C{max_pending} (body bytes waiting for the disk before
        reading pauses), C{checksum_limit} (largest body held whole for its
        C{Upload-Checksum}) and C{cors_origins} (the browser origins allowed,
        C{*} for any).
    """
    return TusSite(FilesResource(uploads, **limits), timeout=timeout, reactor=reactor,
                   page=page_children() if upload_page else None)


__all__ = ["tus_site", "TusUploads", "PreCreateHook", "TusSite", "TusChannel", "TusRequest",
           "FilesResource",
           "TusError", "TUS_VERSION", "EXTENSIONS", "ANONYMOUS"]
