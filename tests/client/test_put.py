"""
The client's PUT: L{Uploader} against real servers on 127.0.0.1 in this
process.  A small file goes whole in one PUT to a server that offers it,
a batch keeps two PUTs in flight on a connection, a break before the
answer sends the same PUT (the same upload id) again and the file is
stored once, larger files and servers that do not offer PUT take the
UPLOAD path, and the client's cap (C{put_max}) is honoured.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from blake3 import blake3
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase

from imgresume.client import BatchItem, UploadFailed, Uploader
from imgresume.client._connection import UploadConnection
from imgresume.client._put import put_entry_algorithm, put_upload_id
from imgresume.errors import ErrorCode
from imgresume.names import is_upload_id
from imgresume.protocol import ServerLimits
from imgresume.storage.memory import MemoryStorage
from tests.support.servers import RoundRobinEndpoint, ServerTestCase, endpoint_of, write_file

PUT_LIMITS = ServerLimits(max_payload=1 << 20, chunk_size=64 * 1024, max_put=256 * 1024)


class CountingStorage:
    """A MemoryStorage that counts its one-step stores and creates."""

    def __init__(self, store_seconds: float = 0.0) -> None:
        self.storage = MemoryStorage()
        self.wholes: list[Any] = []
        self.creates = 0
        #: How long a one-step store takes, as a disk's flushes would.
        self.store_seconds = store_seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(self.storage, name)

    def store_whole(self, request: Any) -> Any:
        self.wholes.append(request)
        if self.store_seconds:
            return deferLater(reactor, self.store_seconds, lambda: None).addCallback(
                lambda _: self.storage.store_whole(request))
        return self.storage.store_whole(request)

    def create(self, request: Any) -> Any:
        self.creates += 1
        return self.storage.create(request)


class PutTests(ServerTestCase):
    """Small files in one PUT."""

    async def test_small_file_in_one_put(self) -> None:
        """A file under the server's put goes in one PUT; the result is as for UPLOAD."""
        storage = CountingStorage()
        _, listening = self.start_server(storage, limits=PUT_LIMITS)
        path, content = self.local_file(10_000)
        result = await self.uploader(endpoint_of(listening)).upload(
            path, "scans/a.tif", metadata={"dpi": "600"})
        self.assertEqual(len(storage.wholes), 1)
        self.assertEqual(storage.creates, 0)
        self.assertEqual(result.upload_id, storage.wholes[0].upload_id)
        # In the connection's negotiated digest (BLAKE3 by default), as UPLOAD's.
        self.assertEqual((result.size, result.sha256, result.digest, result.path),
                         (len(content), blake3(content).hexdigest(), "blake3",
                          "complete/scans/a.tif"))
        self.assertEqual((result.bytes_sent, result.attempts, result.servers),
                         (len(content), 1, ["node-a"]))
        self.assertEqual(storage.read_completed(result.path), content)
        self.assertEqual(storage.wholes[0].metadata, {"dpi": "600"})

    async def test_larger_file_takes_upload(self) -> None:
        """A file over the server's put takes UPLOAD, DATA and the end, as before."""
        storage = CountingStorage()
        _, listening = self.start_server(storage, limits=PUT_LIMITS)
        path, content = self.local_file(256 * 1024 + 1)
        result = await self.uploader(endpoint_of(listening)).upload(path)
        self.assertEqual((len(storage.wholes), storage.creates), (0, 1))
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_client_cap(self) -> None:
        """put_max=0: never a PUT, even to a server that offers it."""
        storage = CountingStorage()
        _, listening = self.start_server(storage, limits=PUT_LIMITS)
        path, _ = self.local_file(1000)
        await self.uploader(endpoint_of(listening), put_max=0).upload(path)
        self.assertEqual((len(storage.wholes), storage.creates), (0, 1))

    async def test_old_server(self) -> None:
        """A server whose WELCOME has no put: UPLOAD, as an older client does."""
        storage = CountingStorage()
        _, listening = self.start_server(storage)  # ServerLimits(): no PUT
        path, content = self.local_file(1000)
        result = await self.uploader(endpoint_of(listening)).upload(path)
        self.assertEqual((len(storage.wholes), storage.creates), (0, 1))
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_batch_pipelines_puts(self) -> None:
        """
        A batch over one connection keeps two PUTs in flight, never more;
        every file is stored once, on one connection.
        """
        storage = CountingStorage(store_seconds=0.05)  # a store as long as a disk's
        _, listening = self.start_server(storage, limits=PUT_LIMITS)
        paths = []
        for number in range(30):
            path = os.path.join(self.work, f"f{number:02}.tif")
            write_file(path, 1000 + number, seed=number)
            paths.append(path)
        in_flight: list[int] = []
        put = UploadConnection.put

        def counting_put(connection: UploadConnection, frame: Any) -> Any:
            answer = put(connection, frame)
            in_flight.append(len(connection._puts))
            return answer

        self.patch(UploadConnection, "put", counting_put)
        batch = await self.uploader(endpoint_of(listening)).upload_batch(paths, parallel=1)
        self.assertEqual(batch.failed, [])
        self.assertEqual(batch.connections, 1)
        self.assertEqual(len(storage.wholes), 30)
        self.assertEqual(max(in_flight), 2)
        self.assertEqual(sorted(storage.files),
                         sorted(f"complete/f{n:02}.tif" for n in range(30)))

    async def test_repeat_after_break_stores_once(self) -> None:
        """
        The connection breaks after the server stored the PUT, before its
        answer arrives: the same PUT (same upload id) goes again and the
        file is stored once.
        """
        storage = CountingStorage()
        path, content = self.local_file(50_000)
        factory, listening = self.start_server(storage, limits=PUT_LIMITS, cut_after=40_000)
        result = await self.uploader(endpoint_of(listening)).upload(path)
        self.assertTrue(factory.cut_done)
        self.assertGreaterEqual(result.attempts, 2)
        self.assertEqual({w.upload_id for w in storage.wholes}, {result.upload_id})
        self.assertEqual(list(storage.files), ["complete/scan.tif"])
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_retry_on_server_without_put_goes_elsewhere(self) -> None:
        """
        A pool being upgraded: the PUT is stored on node-a, whose answer is
        lost; the retry reaches node-b, which predates PUT, where an UPLOAD
        could store the file twice: nothing is sent there, the next try goes
        through the balancer again and node-c, which takes PUT, answers for
        the stored file.  It is stored once.
        """
        storage = CountingStorage()
        path, content = self.local_file(50_000)
        factory_a, port_a = self.start_server(storage, "node-a", limits=PUT_LIMITS,
                                              cut_after=40_000)
        _, port_b = self.start_server(storage, "node-b")  # no PUT
        _, port_c = self.start_server(storage, "node-c", limits=PUT_LIMITS)
        endpoint = RoundRobinEndpoint([
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            for port in (port_a, port_b, port_c)])
        result = await self.uploader(endpoint).upload(path)
        self.assertTrue(factory_a.cut_done)
        self.assertEqual(result.servers, ["node-a", "node-b", "node-c"])
        self.assertEqual(storage.creates, 0)  # no UPLOAD anywhere
        self.assertEqual({w.upload_id for w in storage.wholes}, {result.upload_id})
        self.assertEqual(list(storage.files), ["complete/scan.tif"])
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_refused_put_fails_file(self) -> None:
        """A PUT refused for its name fails that file only, with the server's error."""
        storage = CountingStorage()
        _, listening = self.start_server(storage, limits=PUT_LIMITS)
        path, _ = self.local_file(100)
        other, _ = self.local_file(200, "b.tif")
        uploader: Uploader = self.uploader(endpoint_of(listening))
        result = await uploader.upload_batch(
            [BatchItem(path, "../bad.tif"), BatchItem(other, "good.tif")], parallel=1)
        [failed] = result.failed
        self.assertIsInstance(failed.error, UploadFailed)
        self.assertEqual(failed.error.cause.code, ErrorCode.INVALID_NAME)
        self.assertEqual(list(storage.files), ["complete/good.tif"])


class PutUploadIdTests(SynchronousTestCase):
    """L{put_upload_id}: a PUT's upload id, derived from its name and SHA-256."""

    def test_derived(self) -> None:
        """
        The same name and digest give the same id (a rerun repeats the same
        PUT); another name or another file give another; it is an upload id
        (32 lowercase hex digits), as the documented formula says.
        """
        digest = hashlib.sha256(b"scan").digest()
        first = put_upload_id("day-1/a.tif", digest)
        self.assertEqual(first, put_upload_id("day-1/a.tif", digest))
        self.assertTrue(is_upload_id(first))
        self.assertEqual(first, hashlib.sha256(
            b"imgresume PUT\0day-1/a.tif\0" + digest).hexdigest()[:32])
        self.assertNotEqual(first, put_upload_id("day-1/b.tif", digest))
        self.assertNotEqual(first, put_upload_id("day-1/a.tif", hashlib.sha256(b"x").digest()))

    def test_other_algorithm(self) -> None:
        """
        With another digest the algorithm's name is part of the derivation,
        so a SHA-256 and a BLAKE3 digest never name the same upload.
        """
        value = bytes(range(32))
        blake = put_upload_id("a.tif", value, "blake3")
        self.assertEqual(blake, hashlib.sha256(
            b"imgresume PUT\0a.tif\0blake3\0" + value).hexdigest()[:32])
        self.assertNotEqual(blake, put_upload_id("a.tif", value))

    def test_journal_entry(self) -> None:
        """
        Only a completed entry whose id is its PUT's is a PUT's; its
        algorithm is the one the id was derived with.
        """
        digest = hashlib.sha256(b"scan").digest()
        entry = {"upload_id": put_upload_id("a.tif", digest), "sha256": digest.hex(),
                 "complete": True}
        self.assertEqual(put_entry_algorithm(entry, "a.tif"), "sha256")
        blake = {**entry, "upload_id": put_upload_id("a.tif", digest, "blake3")}
        self.assertEqual(put_entry_algorithm(blake, "a.tif"), "blake3")
        self.assertIsNone(put_entry_algorithm(entry, "b.tif"))
        self.assertIsNone(put_entry_algorithm({**entry, "complete": False}, "a.tif"))
        self.assertIsNone(put_entry_algorithm({**entry, "upload_id": "0" * 32}, "a.tif"))
        self.assertIsNone(put_entry_algorithm({**entry, "sha256": None}, "a.tif"))