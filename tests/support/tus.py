"""
tus clients written by others, on real processes: a cluster of C{twistd
imgresume --http} servers over one storage directory (or one per mount of a
shared filesystem) behind C{twistd
imgresume-lb --check-mode connect} (L{TusCluster}); tus-js-client under
Node from the bench's pinned npm cache (L{node_client}); tuspy
(L{tuspy}) and the offset of each PATCH it sends (L{patch_offsets}); the
server that holds an upload now (L{serving_server}), and an upload run
while that server is SIGKILLed (L{upload_killing_serving}).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from imgresume.testing import (
    free_tcp_port,
    stop_processes,
    twistd_argv,
    wait_until_connectable,
)
from tests.support.processes import child_env

#: The tus-js-client script the tests run: one upload, its own retries;
#: prints a JSON line with the upload's URL (or error), the Upload-Offset of
#: every PATCH it sent, in order, and the Upload-Length a PATCH carried
#: (C{lengths}: offset and length; only with the length deferred, C{defer}).
NODE_SCRIPT = r"""
import { createRequire } from 'node:module'
import fs from 'node:fs'
import { PassThrough } from 'node:stream'
const [, , cache, path, endpoint, chunk, name, auth, defer] = process.argv
const require = createRequire(cache + '/package.json')
const tus = require('tus-js-client')
const size = fs.statSync(path).size
const offsets = []
const lengths = []
const deferred = defer === 'defer'
const headers = auth ? { Authorization: auth } : {}
setTimeout(() => { console.log(JSON.stringify({ error: 'timeout', offsets })); process.exit(4) },
           100000).unref()
// With the length deferred, a plain stream (as for data of unknown length):
// tus-js-client 4.3.1 declares wrong lengths for a file's ReadStream then.
const input = deferred ? fs.createReadStream(path).pipe(new PassThrough())
  : fs.createReadStream(path)
const upload = new tus.Upload(input, {
  endpoint, uploadSize: deferred ? undefined : size, uploadLengthDeferred: deferred, headers,
  chunkSize: chunk === 'inf' ? Infinity : Number(chunk),
  retryDelays: [0, 100, 200, 500, 1000, 1000, 2000, 2000, 4000, 4000],
  storeFingerprintForResuming: false,
  metadata: { filename: name },
  onBeforeRequest: (req) => {
    if (req.getMethod() !== 'PATCH') return
    offsets.push(Number(req.getHeader('Upload-Offset')))
    const length = req.getHeader('Upload-Length')
    if (length) lengths.push([offsets[offsets.length - 1], Number(length)])
  },
  onError: (e) => {
    console.log(JSON.stringify({ error: String(e), offsets, lengths })); process.exit(1)
  },
  onSuccess: () => {
    console.log(JSON.stringify({ url: upload.url, offsets, lengths })); process.exit(0)
  },
})
upload.start()
"""


def node_client() -> tuple[str | None, str]:
    """
    The npm cache holding the pinned tus-js-client (the bench's: installed
    there with npm if missing), or None and why the tests must skip.
    """
    from bench import tus
    from bench._common import Workdir

    if shutil.which("node") is None or shutil.which("npm") is None:
        return None, "node and npm are not installed (Debian: apt-get install nodejs npm)"
    cache = tus.cache_dir()
    want = tus.PACKAGES["tus-js-client"]
    if tus.installed_versions(cache).get("tus-js-client") != want:
        work = Workdir(None)
        try:
            note = tus.TusNode(work, cache).prepare()
        finally:
            work.close()
        if note:
            return None, note
    return cache, ""


class TusCluster:
    """
    N C{twistd imgresume} servers, each also serving tus on a TCP port of
    127.0.0.1 (C{--http}), over one storage directory, behind one
    C{twistd imgresume-lb --check-mode connect} relaying to those ports.
    """

    def __init__(self, directory: str, servers: int = 3, server_args: tuple = (),
                 http: Callable[[int], str] = lambda port: f"tcp:{port}:interface=127.0.0.1",
                 storages: Sequence[str] = ()) -> None:
        """
        @param http: given a free TCP port of 127.0.0.1, the C{--http}
            endpoint string of a server there (e.g. an C{ssl:} one).
        @param storages: the storage directory of each server in turn (the
            same directory through each mount of a shared filesystem), or
            one C{s3://BUCKET/PREFIX} for all; default: C{storage/} in
            C{directory} for all.  C{storage} is
            the first.
        """
        self.directory = os.path.abspath(directory)
        self.storages = list(storages) or [os.path.join(self.directory, "storage")]
        self.storage = self.storages[0]
        if "://" not in self.storage:  # not s3://BUCKET/PREFIX
            os.makedirs(self.storage, exist_ok=True)
        os.makedirs(os.path.join(self.directory, "logs"), exist_ok=True)
        self.sockets = tempfile.mkdtemp(prefix="imgr-tus-")
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv: dict[str, list[str]] = {}
        self.http: dict[str, int] = {}
        for i in range(1, servers + 1):
            name = f"node-{i}"
            port = free_tcp_port()
            self.http[name] = port
            self.argv[name] = twistd_argv(
                "--logfile", self.log(name), "imgresume",
                "--listen", f"unix:{self.sockets}/{name}.sock",
                "--storage", self.storages[(i - 1) % len(self.storages)],
                "--server-id", name, "--http", http(port),
                "--takeover-idle", "1s", *server_args)
        self.lb_port = free_tcp_port()
        backends = [a for port in self.http.values()
                    for a in ("--backend", f"tcp:127.0.0.1:{port}")]
        self.argv["lb"] = twistd_argv(
            "--logfile", self.log("lb"), "imgresume-lb", "--listen",
            f"tcp:{self.lb_port}:interface=127.0.0.1", "--check-mode", "connect",
            "--check-interval", "0.5", *backends)
        self.url = f"http://127.0.0.1:{self.lb_port}/files/"

    def log(self, name: str) -> str:
        return os.path.join(self.directory, "logs", f"{name}.log")

    def start_for(self, test: SynchronousTestCase) -> "TusCluster":
        """L{start}, with L{stop} a cleanup of C{test} (even if a process fails to start)."""
        test.addCleanup(self.stop)
        return self.start()

    def start(self) -> "TusCluster":
        for name in [*self.http, "lb"]:
            self.procs[name] = subprocess.Popen(
                self.argv[name], env=child_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=open(self.log(name) + ".stderr", "ab"))
            port = self.lb_port if name == "lb" else self.http[name]
            wait_until_connectable(("127.0.0.1", port), proc=self.procs[name])
        return self

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        stop_processes(self.procs.values())
        shutil.rmtree(self.sockets, ignore_errors=True)

    def logs(self) -> str:
        text = []
        for path in sorted(glob.glob(os.path.join(self.directory, "logs", "*.log"))):
            with open(path, errors="replace") as f:
                text.append(f"== {os.path.basename(path)}\n{f.read()[-4000:]}")
        return "\n".join(text)


def serving_server(storage: str) -> str | None:
    """The server id in the lease of the one upload in C{storage}, if any."""
    for lease in glob.glob(os.path.join(storage, "incoming", "*", "lease")):
        try:
            with open(lease) as f:
                return json.load(f)["owner"]
        except (OSError, ValueError, KeyError):
            return None
    return None


def stored_bytes(storage: str) -> int:
    """Bytes in the data file of the one upload in C{storage} (0 if none yet)."""
    for data in glob.glob(os.path.join(storage, "incoming", "*", "data")):
        try:
            return os.path.getsize(data)
        except OSError:
            return 0
    return 0


def kill_serving_when(cluster: TusCluster, at_least: int, timeout: float = 60.0) -> str:
    """
    Block until the upload's data holds C{at_least} bytes, then SIGKILL the
    server holding it; the server's name.
    """
    deadline = time.monotonic() + timeout
    while stored_bytes(cluster.storage) < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the upload never reached {at_least} bytes")
        time.sleep(0.005)
    owner = serving_server(cluster.storage)
    assert owner is not None, "no lease on the upload"
    cluster.kill(owner)
    return owner


def tuspy() -> tuple[Any, Any]:
    """tuspy's C{client} and C{uploader} modules; skip the test without tuspy."""
    try:
        from tusclient import client
        from tusclient.uploader import uploader
    except ImportError:
        raise SkipTest("tuspy is not installed (pip install -e '.[test]')")
    return client, uploader


def patch_offsets(test: SynchronousTestCase) -> list[int]:
    """
    The Upload-Offset of every PATCH tuspy sends until C{test} ends, in
    order (each C{TusRequest} it makes is recorded).
    """
    _, uploader_module = tuspy()
    offsets: list[int] = []
    original = uploader_module.TusRequest

    class Recording(original):  # type: ignore[misc, valid-type]
        def __init__(self, uploader: Any) -> None:
            offsets.append(uploader.offset)
            super().__init__(uploader)

    uploader_module.TusRequest = Recording
    test.addCleanup(setattr, uploader_module, "TusRequest", original)
    return offsets


def trust_ca(test: SynchronousTestCase, ca_file: str) -> None:
    """Make the C{requests} under tuspy trust C{ca_file} until C{test} ends."""
    before = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = ca_file
    if before is None:
        test.addCleanup(os.environ.pop, "REQUESTS_CA_BUNDLE")
    else:
        test.addCleanup(os.environ.__setitem__, "REQUESTS_CA_BUNDLE", before)


_T = TypeVar("_T")


async def upload_killing_serving(cluster: TusCluster, at_least: int,
                                 upload: Callable[..., _T], *args: Any) -> tuple[_T, list[str]]:
    """
    Run C{upload(*args)} in a thread while another thread SIGKILLs the
    server holding the upload once its data holds C{at_least} bytes
    (L{kill_serving_when}); wait for both.

    @return: what C{upload} returned, and the server killed (a list of
        one, or empty if the upload ended first).
    """
    killed: list[str] = []
    killer = threading.Thread(
        target=lambda: killed.append(kill_serving_when(cluster, at_least)))
    killer.start()
    try:
        result = await deferToThread(upload, *args)
    finally:
        await deferToThread(killer.join)
    return result, killed
