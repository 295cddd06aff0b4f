# -*- test-case-name: tests.test_integrity -*-
"""
Tests for L{imgresume.integrity}: the algorithm table, the negotiation of
the per-packet checksum and the whole-file digest in HELLO/WELCOME, and
peers of both generations talking to each other (a client or a server that
negotiates nothing gets CRC-32 and SHA-256, exactly as before).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from typing import Any
from unittest import mock

import blake3
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from imgresume import integrity
from imgresume.cli import UploadOptions
from imgresume.client import Journal, UploadResult
from imgresume.client._digest import Digest
from imgresume.client._journal import journal_entry, journal_key
from imgresume.client._source import LocalFile
from imgresume.errors import ChecksumMismatch, ErrorCode, MalformedFrame
from imgresume.protocol import (
    Accepted,
    ClientConnection,
    Data,
    Hello,
    Ping,
    Pong,
    Resume,
    ServerConnection,
    Upload,
    Welcome,
    encode,
)
from imgresume.protocol import _server as server_machine
from imgresume.protocol._decoder import FrameDecoder, control_limit
from imgresume.server import UploadServerFactory
from imgresume.storage.filesystem import FilesystemStorage
from imgresume.storage.interfaces import NewUpload
from imgresume.storage.memory import MemoryStorage
from tests.support.runners import sync_run
from tests.support.servers import ServerTestCase, endpoint_of


class TableTests(SynchronousTestCase):
    """The algorithms by name."""

    def test_checksums(self) -> None:
        """CRC-32C is Castagnoli's (check value of "123456789"), CRC-32 zlib's; both resume."""
        self.assertEqual(integrity.checksum("crc32c", b"123456789"), 0xE3069283)
        self.assertEqual(integrity.checksum("crc32", b"123456789"), zlib.crc32(b"123456789"))
        for name in integrity.CHECKSUMS:
            self.assertEqual(integrity.checksum(name, b""), 0)
            whole = integrity.checksum(name, b"abcdef")
            self.assertEqual(
                integrity.checksum(name, b"def", integrity.checksum(name, b"abc")), whole)

    def test_digests(self) -> None:
        """BLAKE3-256 and SHA-256, 32 bytes each; the digests of no bytes are known."""
        self.assertEqual(integrity.digest_of("sha256", b"x"), hashlib.sha256(b"x").digest())
        self.assertEqual(integrity.digest_of("blake3", b"x"), blake3.blake3(b"x").digest())
        self.assertEqual(integrity.EMPTY_DIGESTS["sha256"].hex()[:8], "e3b0c442")
        self.assertEqual(integrity.EMPTY_DIGESTS["blake3"].hex()[:8], "af1349b9")
        for name in integrity.DIGESTS:
            self.assertEqual(len(integrity.digest_of(name, b"abc")), integrity.DIGEST_SIZE)
            h = integrity.new_digest(name)
            h.update(b"ab")
            h.update(memoryview(b"c"))
            self.assertEqual(h.digest(), integrity.digest_of(name, b"abc"))

    def test_blake3_on_the_calling_thread(self) -> None:
        """
        BLAKE3 hashes on the thread that calls it (C{max_threads=1}): beside
        a busy reactor on two cores, its own thread pool was slower and cost
        more CPU (docs/benchmarks.md, "Integrity work on the reactor thread").
        """
        made: list[dict[str, Any]] = []
        real = blake3.blake3

        def recording(*args: Any, **kwargs: Any) -> Any:
            made.append(kwargs)
            return real(*args, **kwargs)

        with mock.patch.object(blake3, "blake3", recording):
            hasher = integrity.new_digest("blake3")
        hasher.update(b"abc")
        self.assertEqual(hasher.digest(), real(b"abc").digest())
        self.assertEqual(made, [{"max_threads": 1}])

    def test_defaults(self) -> None:
        """CRC-32C and BLAKE3 by default; CRC-32 and SHA-256 for who says nothing."""
        self.assertEqual((integrity.DEFAULT_CHECKSUM, integrity.DEFAULT_DIGEST),
                         ("crc32c", "blake3"))
        self.assertEqual((integrity.LEGACY_CHECKSUM, integrity.LEGACY_DIGEST),
                         ("crc32", "sha256"))


class NegotiationTests(SynchronousTestCase):
    """L{integrity.hello_options}, L{integrity.negotiate}, L{integrity.agreed}."""

    def test_hello_options(self) -> None:
        """A client offers every checksum, best first, and the digest it wants."""
        self.assertEqual(integrity.hello_options(),
                         {"checksums": "crc32c,crc32", "digests": "blake3"})
        self.assertEqual(integrity.hello_options("sha256")["digests"], "sha256")
        self.assertRaises(ValueError, integrity.hello_options, "md5")

    def test_old_client(self) -> None:
        """A HELLO without the keys: CRC-32 and SHA-256, and nothing in WELCOME."""
        self.assertEqual(integrity.negotiate({}), ("crc32", "sha256", {}))
        self.assertEqual(integrity.negotiate({"agent": "x"}), ("crc32", "sha256", {}))

    def test_new_client(self) -> None:
        """The first offered name this server knows wins, and WELCOME says so."""
        self.assertEqual(
            integrity.negotiate({"checksums": "crc32c,crc32", "digests": "blake3"}),
            ("crc32c", "blake3", {"checksum": "crc32c", "digest": "blake3"}))
        self.assertEqual(
            integrity.negotiate({"checksums": "xxh3,crc32", "digests": "sha256"}),
            ("crc32", "sha256", {"checksum": "crc32", "digest": "sha256"}))

    def test_nothing_known(self) -> None:
        """Only unknown names: the legacy pair, still announced."""
        self.assertEqual(
            integrity.negotiate({"checksums": "xxh3", "digests": "k12"}),
            ("crc32", "sha256", {"checksum": "crc32", "digest": "sha256"}))

    def test_agreed(self) -> None:
        """The client takes the WELCOME's choice; an old server's silence is the legacy pair."""
        hello = integrity.hello_options()
        self.assertEqual(integrity.agreed(hello, {}), ("crc32", "sha256"))
        self.assertEqual(integrity.agreed(hello, {"checksum": "crc32c", "digest": "blake3"}),
                         ("crc32c", "blake3"))
        self.assertEqual(integrity.agreed(hello, {"digest": "sha256"}), ("crc32", "sha256"))

    def test_agreed_refuses_what_was_not_offered(self) -> None:
        """A server may not choose an algorithm the client did not offer."""
        self.assertRaises(ValueError, integrity.agreed, {}, {"checksum": "crc32c"})
        self.assertRaises(ValueError, integrity.agreed, integrity.hello_options("sha256"),
                          {"digest": "blake3"})


def _frames(raw: list[bytes]) -> list[Any]:
    decoder = FrameDecoder(control_limit(1 << 20))
    decoder.feed(b"".join(raw))
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


class MachineTests(SynchronousTestCase):
    """The sans-IO machines with and without the options."""

    def welcomed_server(self, options: dict[str, str]) -> tuple[ServerConnection, Welcome]:
        server = ServerConnection("node-a")
        server.receive_data(encode(Hello("c", options=options)))
        server.next_event()
        server.accept_hello()
        [welcome] = _frames(server.data_to_send())
        return server, welcome

    def test_server_welcomes_new_client(self) -> None:
        """A HELLO offering CRC-32C and BLAKE3 is answered with both."""
        server, welcome = self.welcomed_server(integrity.hello_options())
        self.assertEqual((welcome.options["checksum"], welcome.options["digest"]),
                         ("crc32c", "blake3"))
        self.assertEqual((server.checksum, server.digest), ("crc32c", "blake3"))

    def test_server_welcomes_old_client(self) -> None:
        """A HELLO offering nothing gets a WELCOME without the keys, as before."""
        server, welcome = self.welcomed_server({})
        self.assertNotIn("checksum", welcome.options)
        self.assertNotIn("digest", welcome.options)
        self.assertEqual((server.checksum, server.digest), ("crc32", "sha256"))

    def open_upload(self, server: ServerConnection) -> None:
        server.receive_data(encode(Upload("a.tif", 6, b"\1" * 32)))
        server.next_event()
        server.upload_opened("0" * 31 + "1", "a.tif", 6, b"\1" * 32, 0)
        server.data_to_send()

    def test_server_checks_the_negotiated_checksum(self) -> None:
        """With CRC-32C negotiated, a DATA's u32 is a CRC-32C: a CRC-32 there is refused."""
        payload = b"II*\0\0\0"
        server, _ = self.welcomed_server(integrity.hello_options())
        self.open_upload(server)
        server.receive_data(encode(Data(0, zlib.crc32(payload), payload)))
        self.assertIsNone(server.next_event())
        [refusal] = server.refusals()
        self.assertIsInstance(refusal.error, ChecksumMismatch)
        self.assertIn("does not match its CRC-32C", refusal.error.message)
        server.data_to_send()
        server.receive_data(encode(Data(0, integrity.checksum("crc32c", payload), payload)))
        event = server.next_event()
        self.assertEqual((event.offset, event.checksum), (0, "crc32c"))

    def test_server_checks_crc32_for_old_client(self) -> None:
        """Without negotiation a DATA carries a CRC-32, as before."""
        payload = b"II*\0\0\0"
        server, _ = self.welcomed_server({})
        self.open_upload(server)
        server.receive_data(encode(Data(0, zlib.crc32(payload), payload)))
        event = server.next_event()
        self.assertEqual((event.crc32, event.checksum), (zlib.crc32(payload), "crc32"))

    def client_after(self, welcome_options: dict[str, str]) -> ClientConnection:
        client = ClientConnection("c", integrity.hello_options())
        client.hello()
        [hello] = _frames(client.data_to_send())
        self.assertEqual(hello.options, integrity.hello_options())
        client.receive_data(encode(Welcome(1, "s", 1024, 1 << 40, 1024, welcome_options)))
        client.next_event()
        return client

    def test_client_with_old_server(self) -> None:
        """A WELCOME naming nothing (an old server): the client uses CRC-32 and SHA-256."""
        client = self.client_after({"late-digest": "1"})
        self.assertEqual((client.checksum, client.digest), ("crc32", "sha256"))

    def test_client_with_new_server(self) -> None:
        """A WELCOME choosing CRC-32C: DATA carries CRC-32C."""
        client = self.client_after({"checksum": "crc32c", "digest": "blake3"})
        self.assertEqual((client.checksum, client.digest), ("crc32c", "blake3"))
        client.upload(Upload("a.tif", 6, b"\1" * 32))
        client.receive_data(encode(Accepted("0" * 31 + "1", "a.tif", 6, b"\1" * 32, 0, 0, 0,
                                            integrity.EMPTY_DIGESTS["blake3"])))
        client.next_event()
        client.data_to_send()
        client.send_data(0, b"II*\0\0\0")
        [data] = _frames(client.data_to_send())
        self.assertEqual(data.crc32, integrity.checksum("crc32c", b"II*\0\0\0"))

    def test_client_refuses_unoffered_choice(self) -> None:
        """A WELCOME choosing what the client did not offer is a protocol error."""
        client = ClientConnection("c", integrity.hello_options("sha256"))
        client.hello()
        client.receive_data(encode(Welcome(1, "s", 1024, 1 << 40, 1024, {"digest": "blake3"})))
        self.assertRaises(MalformedFrame, client.next_event)


def _old_server(hello: Any) -> tuple[str, str, dict[str, str]]:
    """L{integrity.negotiate} of a server that predates negotiation."""
    return integrity.LEGACY_CHECKSUM, integrity.LEGACY_DIGEST, {}


class PeersTests(ServerTestCase):
    """Real uploads over TCP between peers of either generation."""

    def meta(self, root: str) -> dict[str, Any]:
        [upload_id] = os.listdir(os.path.join(root, "incoming"))
        with open(os.path.join(root, "incoming", upload_id, "meta.json")) as f:
            return json.load(f)

    async def upload(self, size: int = 300_000, **kwargs: Any) -> tuple[Any, str, bytes]:
        root = os.path.join(self.work, "storage")
        _, listening = self.start_server(self.fs_storage(root))
        path, content = self.local_file(size)
        result = await self.uploader(endpoint_of(listening), **kwargs).upload(path, "a.tif")
        self.assertEqual(open(os.path.join(root, result.path), "rb").read(), content)
        return result, root, content

    async def test_new_peers_use_crc32c(self) -> None:
        """Both ends new: the journal records CRC-32C, and meta.json says so (format 3)."""
        result, root, content = await self.upload()
        meta = self.meta(root)
        self.assertEqual((meta["checksum"], meta["format"]), ("crc32c", 3))

    async def test_old_client(self) -> None:
        """A client that offers nothing uploads with CRC-32 and SHA-256, as before."""
        with mock.patch.object(integrity, "hello_options", lambda digest="sha256": {}):
            result, root, content = await self.upload()
        self.assertEqual(result.sha256, hashlib.sha256(content).hexdigest())
        meta = self.meta(root)
        self.assertEqual((meta["checksum"], meta["digest"], meta["format"]),
                         ("crc32", "sha256", 1))

    async def test_old_server(self) -> None:
        """A server that announces nothing gets CRC-32 and SHA-256 from a new client."""
        with mock.patch.object(server_machine.integrity, "negotiate", _old_server):
            result, root, content = await self.upload()  # the client asks for BLAKE3
        self.assertEqual((result.digest, result.sha256),
                         ("sha256", hashlib.sha256(content).hexdigest()))
        meta = self.meta(root)
        self.assertEqual((meta["checksum"], meta["digest"], meta["format"]),
                         ("crc32", "sha256", 1))


class ResultTests(SynchronousTestCase):
    """What C{imgresume upload --json} prints of the digest."""

    def result(self, digest: str) -> UploadResult:
        return UploadResult(name="a.tif", upload_id="0" * 32, size=1, sha256="ab" * 32,
                            path="complete/a.tif", resumed_at=[], bytes_sent=1, attempts=1,
                            servers=["s"], seconds=0.1, digest=digest)

    def test_blake3(self) -> None:
        """A BLAKE3 digest is under "digest" only: no "sha256" key that would lie."""
        row = self.result("blake3").to_json()
        self.assertEqual(row["digest"], {"algorithm": "blake3", "hex": "ab" * 32})
        self.assertNotIn("sha256", row)

    def test_sha256(self) -> None:
        """A SHA-256 is under "digest" and under "sha256", as before."""
        row = self.result("sha256").to_json()
        self.assertEqual(row["digest"], {"algorithm": "sha256", "hex": "ab" * 32})
        self.assertEqual(row["sha256"], "ab" * 32)

    def test_cli_option(self) -> None:
        """C{imgresume upload --digest} takes blake3 (the default) or sha256."""
        options = UploadOptions()
        options.parseOptions(["--to", "tcp:127.0.0.1:1", "f"])
        self.assertEqual(options["digest"], "blake3")
        options = UploadOptions()
        options.parseOptions(["--to", "tcp:127.0.0.1:1", "--digest", "sha256", "f"])
        self.assertEqual(options["digest"], "sha256")
        self.assertRaises(UsageError, UploadOptions().parseOptions,
                          ["--to", "tcp:127.0.0.1:1", "--digest", "md5", "f"])


class DigestTests(ServerTestCase):
    """BLAKE3 end to end, and an upload's digest fixed at its creation."""

    async def test_blake3_by_default(self) -> None:
        """A new client and server agree on BLAKE3: meta.json, result and tail say so."""
        root = os.path.join(self.work, "storage")
        factory, listening = self.start_server(self.fs_storage(root), cut_after=200 * 1024)
        path, content = self.local_file(600_000)
        result = await self.uploader(endpoint_of(listening)).upload(path, "a.tif")
        self.assertTrue(factory.cut_done)
        self.assertEqual(len(result.resumed_at), 1)  # the tail was checked in BLAKE3
        self.assertEqual((result.digest, result.sha256),
                         ("blake3", blake3.blake3(content).hexdigest()))
        [upload_id] = os.listdir(os.path.join(root, "incoming"))
        with open(os.path.join(root, "incoming", upload_id, "meta.json")) as f:
            meta = json.load(f)
        self.assertEqual((meta["digest"], meta["sha256"], meta["format"]),
                         ("blake3", result.sha256, 3))

    async def test_sha256_asked(self) -> None:
        """C{digest="sha256"}: SHA-256 end to end, a record older servers read (format 1)."""
        root = os.path.join(self.work, "storage")
        _, listening = self.start_server(self.fs_storage(root))
        path, content = self.local_file(100_000)
        result = await self.uploader(endpoint_of(listening), digest="sha256").upload(path)
        self.assertEqual((result.digest, result.sha256),
                         ("sha256", hashlib.sha256(content).hexdigest()))

    async def test_skip_compares_in_the_uploads_digest(self) -> None:
        """if-exists=skip: the server hashes the stored file with the UPLOAD's digest."""
        _, listening = self.start_server(self.fs_storage())
        path, content = self.local_file(50_000)
        first = await self.uploader(endpoint_of(listening)).upload(path)
        for digest in ("blake3", "sha256"):
            again = await self.uploader(endpoint_of(listening), digest=digest,
                                        if_exists="skip").upload(path)
            self.assertEqual((again.skipped, again.path, again.digest),
                             (True, first.path, digest))

    def partial(self, storage: Any, path: str, content: bytes, digest: str,
                journal: Journal, endpoint: str) -> str:
        """A partial upload of C{path} made with C{digest}, in the journal as a client leaves it."""
        declared = integrity.digest_of(digest, content)
        writer = self.successResultOf(storage.create(NewUpload(
            "a.tif", len(content), declared, {}, "test-client", digest=digest)))
        self.successResultOf(writer.write(0, content[:1000]))
        self.successResultOf(writer.release())
        source = self.successResultOf(LocalFile.open(path, sync_run))
        key = journal_key(source.fingerprint, endpoint, "a.tif")
        source.close()
        journal.remember(key, writer.info.upload_id, declared.hex())
        return writer.info.upload_id

    async def resumed_with_other_digest(self, made: str, asked: str) -> None:
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        endpoint = endpoint_of(listening)
        path, content = self.local_file(30_000)
        journal = Journal(os.path.join(self.work, "journal.json"))
        old_id = self.partial(storage, path, content, made, journal, endpoint)
        result = await self.uploader(endpoint, journal=journal, digest=asked).upload(
            path, "a.tif")
        # Refused (DIGEST_ALGORITHM_MISMATCH), then a fresh upload, hashed anew.
        self.assertEqual(result.attempts, 2)
        self.assertNotEqual(result.upload_id, old_id)
        self.assertEqual((result.digest, result.sha256),
                         (asked, integrity.digest_of(asked, content).hex()))
        self.assertEqual(storage.read_completed(result.path), content)

    async def test_blake3_upload_resumed_asking_sha256(self) -> None:
        """A BLAKE3 partial, resumed by a client asking SHA-256: refused, started afresh."""
        await self.resumed_with_other_digest("blake3", "sha256")

    async def test_sha256_upload_resumed_asking_blake3(self) -> None:
        """A SHA-256 partial (an older client's), resumed by a BLAKE3 client: started afresh."""
        await self.resumed_with_other_digest("sha256", "blake3")

    async def test_same_digest_resumes(self) -> None:
        """A partial whose digest is the connection's is resumed, not restarted."""
        storage = MemoryStorage()
        _, listening = self.start_server(storage)
        endpoint = endpoint_of(listening)
        path, content = self.local_file(30_000)
        journal = Journal(os.path.join(self.work, "journal.json"))
        old_id = self.partial(storage, path, content, "blake3", journal, endpoint)
        result = await self.uploader(endpoint, journal=journal).upload(path, "a.tif")
        self.assertEqual((result.upload_id, result.resumed_at, result.attempts),
                         (old_id, [1000], 1))


class JournalDigestTests(ServerTestCase):
    """
    A digest from the client's journal is declared for a fresh upload only
    when the journal names its algorithm and it is the connection's; else
    the file is hashed again.
    """

    async def upload_after_lost_partial(self, recorded: str | None, asked: str) -> tuple[
            list[str], dict[str, Any], UploadResult]:
        """
        Upload a file whose journal entry (its digest in C{recorded}, or
        naming no algorithm for None) names an upload the server does not
        know; the algorithms it was hashed in, its new entry and the result.
        """
        _, listening = self.start_server(MemoryStorage())
        endpoint = endpoint_of(listening)
        path, content = self.local_file(30_000)
        journal = Journal(os.path.join(self.work, "journal.json"))
        source = self.successResultOf(LocalFile.open(path, sync_run))
        key = journal_key(source.fingerprint, endpoint, "a.tif")
        source.close()
        entry = journal_entry("ab" * 16, integrity.digest_of(recorded or "blake3", content).hex())
        if recorded is not None:
            entry["digest"] = recorded
        journal.update({key: entry})
        hashed: list[str] = []
        real = LocalFile.sha256

        def counting(self: LocalFile, *args: Any, **kwargs: Any) -> Any:
            hashed.append(kwargs["algorithm"])
            return real(self, *args, **kwargs)

        with mock.patch.object(LocalFile, "sha256", counting):
            result = await self.uploader(endpoint, journal=journal, digest=asked).upload(
                path, "a.tif")
        self.assertEqual((result.digest, result.sha256, result.attempts),
                         (asked, integrity.digest_of(asked, content).hex(), 2))
        after = journal.lookup(key)
        assert after is not None
        return hashed, after, result

    async def test_same_algorithm_declared(self) -> None:
        """The journal's BLAKE3, on a BLAKE3 connection: declared, the file not hashed again."""
        hashed, after, result = await self.upload_after_lost_partial("blake3", "blake3")
        self.assertEqual(hashed, [])
        self.assertEqual((after["digest"], after["sha256"], after["complete"]),
                         ("blake3", result.sha256, True))

    async def test_other_algorithm_hashed(self) -> None:
        """The journal's SHA-256, on a BLAKE3 connection: hashed again in BLAKE3."""
        hashed, after, _ = await self.upload_after_lost_partial("sha256", "blake3")
        self.assertEqual(hashed, ["blake3"])
        self.assertEqual(after["digest"], "blake3")

    async def test_unnamed_algorithm_hashed(self) -> None:
        """
        A record that names no algorithm (written before records did) is
        never declared for a fresh upload: the file is hashed again.
        """
        for asked in ("blake3", "sha256"):
            hashed, after, _ = await self.upload_after_lost_partial(None, asked)
            self.assertEqual(hashed, [asked])
            self.assertEqual(after["digest"], asked)
            os.unlink(os.path.join(self.work, "journal.json"))


class RefusalTests(SynchronousTestCase):
    """The server's answer to a RESUME in another digest, on the wire."""

    def test_resume_in_another_digest(self) -> None:
        """DIGEST_ALGORITHM_MISMATCH, command scope: the connection stays ready."""
        storage = MemoryStorage()
        writer = self.successResultOf(storage.create(NewUpload(
            "a.tif", 3, integrity.digest_of("blake3", b"abc"), {}, "c", digest="blake3")))
        self.successResultOf(writer.release())
        factory = UploadServerFactory(storage, "node-a", Clock())
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode(Hello("c", options=integrity.hello_options("sha256"))))
        proto.dataReceived(encode(Resume(writer.info.upload_id)))
        proto.dataReceived(encode(Ping(7)))
        welcome, error, pong = _frames([transport.value()])
        self.assertEqual(welcome.options["digest"], "sha256")
        self.assertEqual(error.code, ErrorCode.DIGEST_ALGORITHM_MISMATCH)
        self.assertIn("was created with BLAKE3 digests, but this connection negotiated "
                      "SHA-256", error.message)
        self.assertEqual(pong, Pong(7))
        self.assertFalse(transport.disconnecting)


class ClientDigestTests(SynchronousTestCase):
    """The client's digest of a file follows the connection's algorithm."""

    def test_use(self) -> None:
        """A digest in another algorithm is dropped and computed again; None adopts."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"abc")
        source = self.successResultOf(LocalFile.open(path, sync_run))
        self.addCleanup(source.close)
        digest = Digest(source)
        digest.use("blake3")
        self.assertEqual(self.successResultOf(digest.wait()), blake3.blake3(b"abc").digest())
        digest.use("sha256")
        self.assertIsNone(digest.value)
        self.assertEqual(self.successResultOf(digest.wait()), hashlib.sha256(b"abc").digest())
        digest.value, digest.algorithm = b"j" * 32, None  # from the journal
        digest.use("blake3")
        self.assertEqual((digest.value, digest.algorithm), (b"j" * 32, "blake3"))


class OldRecordTests(SynchronousTestCase):
    """Uploads written before the algorithms were recorded still resume."""

    def test_record_without_algorithms(self) -> None:
        """
        A meta.json without "digest" and "checksum" (format 1, as the last
        release wrote it) holds SHA-256 and CRC-32 records: proven, resumed
        and completed as such.
        """
        root = tempfile.mkdtemp(prefix="imgresume-test-")
        self.addCleanup(shutil.rmtree, root, True)
        storage = FilesystemStorage(root, sync_run)
        content = os.urandom(20_000)
        writer = self.successResultOf(storage.create(NewUpload(
            "a.tif", len(content), hashlib.sha256(content).digest(), {}, "c")))
        self.successResultOf(writer.write(0, content[:8000]))
        self.successResultOf(writer.release())
        meta_path = os.path.join(root, "incoming", writer.info.upload_id, "meta.json")
        with open(meta_path) as f:
            meta = json.load(f)
        self.assertEqual((meta["digest"], meta["checksum"], meta["format"]),
                         ("sha256", "crc32", 1))
        del meta["digest"], meta["checksum"]
        with open(meta_path, "w") as f:
            json.dump(meta, f)
        resumed = self.successResultOf(storage.resume(writer.info.upload_id))
        self.assertEqual((resumed.offset, resumed.info.digest), (8000, "sha256"))
        self.assertEqual(resumed.tail.sha256, hashlib.sha256(content[:8000]).digest())
        self.successResultOf(resumed.write(8000, content[8000:]))
        done = self.successResultOf(resumed.complete())
        self.assertEqual((done.sha256, done.digest),
                         (hashlib.sha256(content).digest(), "sha256"))
