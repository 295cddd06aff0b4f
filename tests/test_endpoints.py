"""Which endpoint strings count as reachable only from this host."""

from twisted.trial.unittest import SynchronousTestCase

from imgresume._endpoints import is_local_only


class LocalOnlyTests(SynchronousTestCase):
    def test_local(self) -> None:
        """UNIX sockets and loopback interfaces are local, also behind haproxy:."""
        for desc in ("unix:/run/x.sock", "tcp:9000:interface=127.0.0.1",
                     "tcp6:9000:interface=\\:\\:1", "tcp:9000:interface=localhost",
                     "haproxy:tcp:9000:interface=127.0.0.2",
                     "ssl:9000:privateKey=k.pem:interface=127.0.0.1"):
            self.assertTrue(is_local_only(desc), desc)

    def test_reachable(self) -> None:
        """No interface, a real interface, or an unknown kind count as reachable."""
        for desc in ("tcp:9000", "tcp:9000:interface=0.0.0.0", "tcp:9000:interface=10.1.2.3",
                     "ssl:9000:privateKey=k.pem", "haproxy:tcp:9000", "systemd:domain=INET:index=0"):
            self.assertFalse(is_local_only(desc), desc)
