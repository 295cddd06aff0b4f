"""
Handshake authentication: per-client keys, challenge-response (no secret on
the wire, no replay), mutual proof, revocation without restart, and uploads
bound to the client that made them.
"""

import hashlib
import json
import os
import stat

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imgresume import keys
from imgresume.client import UploadFailed, Uploader
from imgresume.errors import ErrorCode, HandshakeRejected, UnknownUpload
from imgresume.protocol import Challenge, ClientConnection, Hello, Welcome, encode
from imgresume.protocol import _auth as auth
from imgresume.server import UploadServerFactory
from imgresume.storage.memory import MemoryStorage
from tests.support.options import server_options
from tests.support.runners import sync_run
from tests.support.wire import frames_written, new_decoder


class KeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "keys.json")

    def test_add_list_revoke(self) -> None:
        """Keys are created once, listed without secrets, and revoked in place."""
        key = keys.add_client(self.path, "scanner-7")
        self.assertEqual(len(key), 32)
        self.assertEqual(keys.load_keys(self.path), {"scanner-7": key})
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        [entry] = keys.list_clients(self.path)
        self.assertEqual(entry["client_id"], "scanner-7")
        self.assertNotIn("key", entry)
        self.assertRaises(keys.KeyFileError, keys.add_client, self.path, "scanner-7")
        rotated = keys.add_client(self.path, "scanner-7", rotate=True)
        self.assertNotEqual(rotated, key)
        keys.revoke_client(self.path, "scanner-7")
        self.assertEqual(keys.load_keys(self.path), {})
        self.assertIsNotNone(keys.list_clients(self.path)[0]["revoked"])

    def test_bad_files(self) -> None:
        """A missing or malformed key file is a clear error, not an empty key set."""
        self.assertRaises(keys.KeyFileError, keys.load_keys, self.path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump({"format": 1, "clients": {"a": {"key": "zz"}}}, f)
        self.assertRaises(keys.KeyFileError, keys.load_keys, self.path)
        self.assertRaises(keys.KeyFileError, keys.add_client, self.path, "../evil")

    def test_store_reloads_on_change(self) -> None:
        """The server notices added and revoked clients without a restart."""
        first = keys.add_client(self.path, "a")
        clock = Clock()
        store = keys.KeyStore(self.path, sync_run, clock, interval=2)
        store.start()
        self.assertEqual(store.lookup("a"), first)
        second = keys.add_client(self.path, "b")
        clock.advance(2)
        self.assertEqual(store.lookup("b"), second)
        keys.revoke_client(self.path, "a")
        clock.advance(2)
        self.assertIsNone(store.lookup("a"))
        with open(self.path, "w") as f:
            f.write("{broken")
        clock.advance(2)
        self.assertEqual(store.lookup("b"), second)  # a broken file changes nothing
        self.flushLoggedErrors()
        store.stop()


class Wire:
    """A server protocol on a StringTransport, fed raw frames."""

    def __init__(self, factory: UploadServerFactory) -> None:
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.decoder = new_decoder()

    def send(self, *raw: bytes) -> list:
        for r in raw:
            self.proto.dataReceived(r)
        return frames_written(self.transport, self.decoder)


class HandshakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        path = os.path.join(self.mktemp(), "keys.json")
        self.key = keys.add_client(path, "scanner-7")
        store = keys.KeyStore(path, sync_run, Clock())
        self.factory = UploadServerFactory(MemoryStorage(), "node-a", Clock(), keys=store)

    def handshake(self, client: ClientConnection) -> tuple[bytes, list]:
        """Run a handshake; return every byte that crossed the wire, and the events."""
        wire = Wire(self.factory)
        client.hello()
        events = []
        seen = bytearray()
        for _ in range(3):
            out = client.data_to_send()
            if not out:
                break
            seen += b"".join(out)
            for frame in wire.send(*out):
                seen += encode(frame)
                client.receive_data(encode(frame))
                try:
                    while (e := client.next_event()) is not None:
                        events.append(e)
                except HandshakeRejected as e:
                    events.append(e)
        return bytes(seen), events

    def test_key_never_travels_and_both_sides_prove(self) -> None:
        """The right key gets WELCOME with a server proof; the key is not on the wire."""
        client = ClientConnection("scanner-7", key=self.key)
        wire_bytes, events = self.handshake(client)
        self.assertEqual([type(e).__name__ for e in events], ["Challenged", "Welcomed"])
        self.assertGreater(len(wire_bytes), 100)
        self.assertNotIn(self.key, wire_bytes)
        self.assertNotIn(self.key.hex().encode(), wire_bytes)

    def test_wrong_key_or_unknown_client(self) -> None:
        """A wrong key and an unknown client get the same refusal."""
        for client in (ClientConnection("scanner-7", key=os.urandom(32)),
                       ClientConnection("nobody", key=self.key)):
            wire = Wire(self.factory)
            client.hello()
            [challenge] = wire.send(*client.data_to_send())
            self.assertIsInstance(challenge, Challenge)
            client.receive_data(encode(challenge))
            client.next_event()
            [err] = wire.send(*client.data_to_send())
            self.assertEqual(err.code, ErrorCode.HANDSHAKE_REJECTED)
            self.assertIn("unknown or revoked client id, or wrong key", err.message)
            self.assertTrue(wire.transport.disconnecting)

    def test_client_without_key_is_told(self) -> None:
        """A client that does not offer authentication learns that it must."""
        wire = Wire(self.factory)
        [err] = wire.send(encode(Hello("scanner-7")))
        self.assertEqual(err.code, ErrorCode.HANDSHAKE_REJECTED)
        self.assertIn("requires authentication", err.message)

    def test_captured_handshake_cannot_be_replayed(self) -> None:
        """AUTH recorded from one connection fails on the next (fresh nonce)."""
        client = ClientConnection("scanner-7", key=self.key)
        wire = Wire(self.factory)
        client.hello()
        hello_bytes = client.data_to_send()
        [challenge] = wire.send(*hello_bytes)
        client.receive_data(encode(challenge))
        client.next_event()
        auth_bytes = client.data_to_send()
        [welcome] = wire.send(*auth_bytes)
        self.assertIsInstance(welcome, Welcome)
        replay = Wire(self.factory)
        [challenge2] = replay.send(*hello_bytes)
        self.assertNotEqual(challenge2.nonce, challenge.nonce)
        [err] = replay.send(*auth_bytes)
        self.assertEqual(err.code, ErrorCode.HANDSHAKE_REJECTED)

    def test_impostor_server_is_refused_by_the_client(self) -> None:
        """A server that does not know the key cannot fool a client that has one."""
        client = ClientConnection("scanner-7", key=self.key)
        client.hello()
        client.data_to_send()
        client.receive_data(encode(Challenge("evil", os.urandom(32))))
        client.next_event()
        client.receive_data(encode(Welcome(1, "evil", 1 << 20, 1 << 30, 1 << 20,
                                           {"auth-proof": "00" * 32})))
        self.assertRaises(HandshakeRejected, client.next_event)
        plain = ClientConnection("scanner-7", key=self.key)
        plain.hello()
        plain.receive_data(encode(Welcome(1, "evil", 1 << 20, 1 << 30, 1 << 20)))
        self.assertRaises(HandshakeRejected, plain.next_event)

    def test_proofs_differ_by_role(self) -> None:
        """A client's proof can never pass as a server's, or the other way round."""
        a, b = os.urandom(32), os.urandom(32)
        self.assertNotEqual(auth.client_proof(self.key, a, b, "c", "s"),
                            auth.server_proof(self.key, a, b, "c", "s"))


class EndToEndTests(TestCase):
    async def test_authenticated_upload_and_ownership(self) -> None:
        """Real sockets: the keyed client uploads; another client cannot resume its upload."""
        path = os.path.join(self.mktemp(), "keys.json")
        alice = keys.add_client(path, "alice")
        mallory = keys.add_client(path, "mallory")
        storage = MemoryStorage()
        factory = UploadServerFactory(storage, "node-a", reactor,
                                      keys=keys.KeyStore(path, sync_run, reactor))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        endpoint = f"tcp:127.0.0.1:{port.getHost().port}"
        data = os.urandom(300_000)
        local = os.path.join(self.mktemp())
        with open(local, "wb") as f:
            f.write(data)
        result = await Uploader(endpoint, reactor=reactor, client_id="alice", key=alice,
                                journal=None, digest="sha256").upload(local, "a.tif")
        self.assertEqual(storage.read_completed(result.path), data)
        self.assertEqual(result.sha256, hashlib.sha256(data).hexdigest())
        # Mallory knows the upload id but cannot resume it or learn anything.
        self.failureResultOf(storage.resume(result.upload_id, "mallory"), UnknownUpload)
        try:
            await Uploader(endpoint, reactor=reactor, client_id="alice", key=mallory,
                           journal=None, max_attempts=1).upload(local, "b.tif")
        except UploadFailed as e:
            self.assertIsInstance(e.cause, HandshakeRejected)
        else:
            self.fail("a client with another client's id and its own key got in")


class SecureByDefaultTests(SynchronousTestCase):
    def parse(self, *args: str):
        return server_options(self, *args)

    def mktemp_dir(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_public_listen_needs_keys_or_insecure(self) -> None:
        """Listening beyond loopback without keys is refused unless --insecure."""
        from twisted.python.usage import UsageError

        with self.assertRaises(UsageError) as caught:
            self.parse("--listen", "tcp:9000")
        self.assertIn("--insecure", str(caught.exception))
        self.assertTrue(self.parse("--listen", "tcp:9000", "--insecure")["insecure"])
        self.parse("--listen", "tcp:9000:interface=127.0.0.1")
        keyfile = os.path.join(self.mktemp_dir(), "keys.json")
        keys.add_client(keyfile, "a")
        self.assertEqual(self.parse("--listen", "tcp:9000", "--keys", keyfile)["keys"], keyfile)

    def test_bad_key_file_is_a_usage_error(self) -> None:
        """A server is not started with a key file it cannot read."""
        from twisted.python.usage import UsageError

        self.assertRaises(UsageError, self.parse, "--keys", "/nonexistent/keys.json")


class KeysCommandTests(TestCase):
    async def test_keys_commands_and_authenticated_cli_upload(self) -> None:
        """`imgresume keys add/list/revoke` and an authenticated `imgresume upload`."""
        import subprocess
        import sys

        from tests.support.processes import TwistdServer

        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        keyfile = os.path.join(work, "keys.json")
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))

        def run_cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "imgresume", *args], env=env,
                                  capture_output=True, text=True, cwd=work)

        cli = run_cli

        added = cli("keys", "add", "--keys", keyfile, "scanner-7")
        self.assertEqual(added.returncode, 0, added.stderr)
        keyhex = added.stdout.strip()
        self.assertEqual(len(bytes.fromhex(keyhex)), 32)
        with open(os.path.join(work, "scanner-7.key"), "w") as f:
            f.write(keyhex + "\n")
        listed = cli("keys", "list", "--keys", keyfile, "--json")
        self.assertEqual([c["client_id"] for c in json.loads(listed.stdout)], ["scanner-7"])
        self.assertNotIn(keyhex, listed.stdout)
        server = await TwistdServer(self, "--keys", keyfile).start()
        data = os.urandom(100_000)
        with open(os.path.join(work, "scan.tif"), "wb") as f:
            f.write(data)
        base = ["upload", "--to", server.endpoint, "--client-id", "scanner-7", "--no-journal",
                "--max-attempts", "1", "scan.tif", "--json", "--digest", "sha256"]
        refused = cli(*base)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("requires authentication", refused.stderr)
        ok = cli(*base, "--key-file", "scanner-7.key")
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertEqual(json.loads(ok.stdout)["sha256"], hashlib.sha256(data).hexdigest())
        self.assertEqual(cli("keys", "revoke", "--keys", keyfile, "scanner-7").returncode, 0)
        import time

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            again = cli(*base, "--key-file", "scanner-7.key")
            if again.returncode == 1:
                break
            time.sleep(0.5)
        self.assertIn("authentication failed", again.stderr)


class HealthCheckSessionTests(SynchronousTestCase):
    def test_health_check_needs_no_key_but_may_only_ping(self) -> None:
        """A balancer's health check is welcomed without a key, for PING only."""
        from imgresume.protocol import HEALTH_CHECK_CLIENT_ID, Ping, Pong, Upload

        path = os.path.join(self.mktemp(), "keys.json")
        keys.add_client(path, "scanner-7")
        factory = UploadServerFactory(MemoryStorage(), "node-a", Clock(),
                                      keys=keys.KeyStore(path, sync_run, Clock()))
        wire = Wire(factory)
        [welcome] = wire.send(encode(Hello(HEALTH_CHECK_CLIENT_ID)))
        self.assertIsInstance(welcome, Welcome)
        self.assertEqual(wire.send(encode(Ping(5))), [Pong(5)])
        [err] = wire.send(encode(Upload("x.tif", 1, None)))
        self.assertEqual(err.code, ErrorCode.HANDSHAKE_REJECTED)
        self.assertTrue(wire.transport.disconnecting)
