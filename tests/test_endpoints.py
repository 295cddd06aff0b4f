"""Which endpoint strings count as reachable only from this host."""

from twisted.trial.unittest import SynchronousTestCase

from imgresume._endpoints import client_endpoint, endpoint_address, is_local_only


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


class ClientEndpointTests(SynchronousTestCase):
    """What C{--to} accepts (L{client_endpoint}), and how peers are named (L{endpoint_address})."""

    def test_host_port(self) -> None:
        """HOST:PORT and [IPV6]:PORT are TCP; endpoint strings stay as they are."""
        cases = {
            "127.0.0.1:7000": "tcp:127.0.0.1:7000",
            "lb.example:7000": "tcp:lb.example:7000",
            "[::1]:7000": "tcp:\\:\\:1:7000",
            "tcp:lb.example:7000": "tcp:lb.example:7000",
            "unix:/run/imgresume.sock": "unix:/run/imgresume.sock",
            "unix:7000": "unix:7000",  # a socket file named 7000, not a port
            "tls:lb.example:7000:trustRoots=/etc/ssl/certs":
                "tls:lb.example:7000:trustRoots=/etc/ssl/certs",
            "ssl:host=h:port=9": "ssl:host=h:port=9",
        }
        for given, expected in cases.items():
            self.assertEqual(client_endpoint(given), expected, given)

    def test_bad_ports(self) -> None:
        """A port that is not a number from 1 to 65535, or none: a ValueError that says so."""
        for given, message in [
            ("tcp:host:notaport", "the port must be a number from 1 to 65535, not 'notaport'"),
            ("tcp:host:0", "not '0'"),
            ("ssl:host=h:port=70000", "not '70000'"),
            ("tcp:host", "no port (give tcp:HOST:PORT)"),
        ]:
            with self.assertRaises(ValueError) as caught:
                client_endpoint(given)
            self.assertIn(message, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith(given + ": "))

    def test_address(self) -> None:
        """HOST:PORT for TCP, TLS and SSL, [IPV6]:PORT, the path for UNIX, else the string."""
        self.assertEqual(endpoint_address("tcp:127.0.0.1:7000"), "127.0.0.1:7000")
        self.assertEqual(endpoint_address("tcp:\\:\\:1:7000"), "[::1]:7000")
        self.assertEqual(endpoint_address("ssl:host=h:port=9:caCertsDir=/x"), "h:9")
        self.assertEqual(endpoint_address("unix:/run/x.sock"), "/run/x.sock")
        self.assertEqual(endpoint_address("MemoryNetwork()"), "MemoryNetwork()")
