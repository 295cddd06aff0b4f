# -*- test-case-name: tests.bench.test_single -*-
"""
Tests for the single-stream group's C{--digest} (issue 13): the option, the
client spec and storage-only run it reaches (L{bench.imgresume_runs}), and
the targets L{bench.report} states for the digest the upload used.  Nothing
here starts a server or a clock.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench import imgresume_runs, report
from bench.__main__ import parse_args

SHA256_TARGET = "with --digest sha256: imgresume direct >= 0.7x rsync --append-verify"


def _stream(name: str, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"name": name, "bytes": 1 << 30, "seconds": seconds,
            "cpu": {"client": 1.0, "server": 2.0}, **extra}


def _imgresume(seconds: float, digest: str | None) -> dict[str, Any]:
    return _stream("imgresume-direct", seconds, transfer_seconds=seconds, hash_seconds=0.0,
                   bytes_sent=1 << 30, completion_seconds=0.0, ack_interval_ms=1.0,
                   packets=1024, **({"digest": digest} if digest else {}))


def _results(direct_seconds: float, digest: str | None) -> dict[str, Any]:
    groups = {"single": {"samples": {
        "rsync-append-verify": [_stream("rsync-append-verify", 1.0)],
        "imgresume-direct": [_imgresume(direct_seconds, digest)],
    }, "notes": []}}
    return {"groups": groups, "summary": report.summarise(groups),
            "config": {"mode": "quick", "size": 1 << 30, "repeat": 1},
            "machine": {"cpus": 2, "loadavg_start": [1.0], "loadavg_end": [2.0]}}


def _target(results: dict[str, Any], start: str) -> dict[str, Any]:
    [t] = [t for t in results["summary"]["targets"] if t["target"].startswith(start)]
    return t


class OptionTests(SynchronousTestCase):
    """C{python -m bench --digest}."""

    def test_digest(self) -> None:
        """--digest takes the digests the client knows; absent, the client's default."""
        self.assertEqual(parse_args(["--only", "single", "--digest", "sha256"]).digest, "sha256")
        self.assertIsNone(parse_args(["--only", "single"]).digest)
        self.assertRaises(SystemExit, parse_args, ["--digest", "md5"])


class _Cluster:
    """Just what L{imgresume_runs.single_stream} asks of a cluster."""

    def clear_storage(self) -> None:
        pass

    def endpoint(self, node: str) -> str:
        return f"tcp:127.0.0.1:1:{node}"

    def cpu(self) -> dict[str, float]:
        return {}


class _Work:
    def sub(self, *parts: str) -> str:
        return "/".join(parts)

    def fresh(self, name: str) -> str:
        return name


class RunTests(SynchronousTestCase):
    """The digest asked for reaches the client process and the storage-only run."""

    def test_client_spec(self) -> None:
        """The client spec carries the digest; the sample names the one the upload used."""
        specs = []

        def run_client(spec: dict[str, Any], stderr: str) -> dict[str, Any]:
            specs.append(spec)
            return {"cpu": 1.0, "hash_cpu": 0.5, "uploads": [{
                "error": None, "size": 10, "start": 0.0, "hashed": 0.0, "end": 1.0,
                "acks": [0.0, 0.5, 1.0], "bytes_sent": 10, "attempts": 1,
                "digest": "sha256"}]}

        self.patch(imgresume_runs, "_run_client", run_client)
        sample = imgresume_runs.single_stream(_Cluster(), "src", "direct", _Work(),
                                              digest="sha256")
        self.assertEqual(specs[0]["digest"], "sha256")
        self.assertEqual(sample["digest"], "sha256")

    def test_storage_only(self) -> None:
        """The storage-only run is given the digest as its fourth argument, or none."""
        calls = []

        def run_python(module: str, args: list[str]) -> dict[str, Any]:
            calls.append(args)
            return dict.fromkeys(("bytes", "seconds", "write_seconds", "complete_seconds",
                                  "write_ms_median", "pwrite_seconds", "fdatasync_seconds",
                                  "writes", "cpu"), 1)

        self.patch(imgresume_runs, "run_python", run_python)
        imgresume_runs.storage_only(_Work(), "src", None, "sha256")
        imgresume_runs.storage_only(_Work(), "src")
        self.assertEqual(calls, [["src", "storage-only", str(1 << 20), "sha256"],
                                 ["src", "storage-only", str(1 << 20)]])


class TargetTests(SynchronousTestCase):
    """The targets stated for a run with --digest sha256, and for one without."""

    def test_sha256_met(self) -> None:
        """0.7x rsync with SHA-256 is met; the table says which digest the rows used."""
        r = _results(1.25, "sha256")  # 0.8x rsync
        t = _target(r, SHA256_TARGET)
        self.assertAlmostEqual(t["value"], 0.8)
        self.assertIs(t["met"], True)
        text = report.table(r)
        self.assertIn("imgresume with --digest sha256,", text.splitlines()[0])
        self.assertIn("end to end, hashing included): 0.80x -- met", text)

    def test_sha256_not_met(self) -> None:
        """
        Below 0.7x it is NOT MET; the default-settings targets are not
        measured by such a run, and say so.
        """
        r = _results(2.0, "sha256")  # 0.5x rsync
        self.assertIs(_target(r, SHA256_TARGET)["met"], False)
        self.assertIn("0.50x -- NOT MET", report.table(r))
        default = _target(r, "imgresume direct >= 1.0x rsync")
        self.assertIsNone(default["met"])
        self.assertIn("this run used --digest sha256", default["also"])
        self.assertIsNone(_target(r, "imgresume direct >= 1.5x tus-node-server")["met"])

    def test_default_run(self) -> None:
        """A run with the default digest states the SHA-256 target as not measured."""
        for digest in ("blake3", None):  # None: results from before the digest was recorded
            r = _results(1.0, digest)
            t = _target(r, SHA256_TARGET)
            self.assertIsNone(t["met"])
            self.assertIn("--digest sha256", t["also"])
            self.assertIs(_target(r, "imgresume direct >= 1.0x rsync")["met"], True)
