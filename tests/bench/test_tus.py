# -*- test-case-name: tests.bench.test_tus -*-
"""
Tests for the pure parts of the tus baseline (issue 13, item 6): Node's
version and the installed packages read (L{bench.tus}), stored uploads
checked against their sources, the single group's ratio to tus-node-server
and its target (L{bench.report}), the rows and targets of tus over imgresume
(issue 14, L{bench.tus_imgresume}), and the batch group's tus row
(L{bench.batch}).  Nothing here runs Node, npm or a clock.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bench import batch, report, tus, tus_imgresume


class VersionTests(SynchronousTestCase):
    """L{tus.parse_node_version}, L{tus.installed_versions}, L{tus.cache_dir}."""

    def test_node_version(self) -> None:
        """C{node --version}'s output as a tuple; anything else is None."""
        self.assertEqual(tus.parse_node_version("v20.19.2\n"), (20, 19, 2))
        self.assertEqual(tus.parse_node_version("22.1.0"), (22, 1, 0))
        self.assertIsNone(tus.parse_node_version(""))
        self.assertIsNone(tus.parse_node_version("node: not found"))
        self.assertLess(tus.parse_node_version("v20.18.9"), tus.NODE_MIN)
        self.assertGreaterEqual(tus.parse_node_version("v20.19.0"), tus.NODE_MIN)

    def test_installed_versions(self) -> None:
        """
        Each package's version from its package.json under node_modules; a
        package missing or unreadable is left out, so the pins do not match
        and the bench installs again.
        """
        prefix = self.mktemp()
        for name, version in [("@tus/server", "2.4.5"), ("tus-js-client", "4.3.0")]:
            d = os.path.join(prefix, "node_modules", name)
            os.makedirs(d)
            with open(os.path.join(d, "package.json"), "w") as f:
                json.dump({"name": name, "version": version}, f)
        os.makedirs(os.path.join(prefix, "node_modules", "@tus", "file-store"))
        got = tus.installed_versions(prefix)
        self.assertEqual(got, {"@tus/server": "2.4.5", "tus-js-client": "4.3.0"})
        self.assertNotEqual(got, tus.PACKAGES)
        self.assertEqual(tus.installed_versions(self.mktemp()), {})

    def test_pins_exact(self) -> None:
        """The packages are pinned to exact versions, not ranges."""
        self.assertEqual(sorted(tus.PACKAGES), ["@tus/file-store", "@tus/server",
                                                "tus-js-client"])
        for version in tus.PACKAGES.values():
            self.assertIsNotNone(tus.parse_node_version(version))
            self.assertNotRegex(version, r"[\^~<>*x ]")

    def test_cache_dir(self) -> None:
        """An explicit directory wins; otherwise under $XDG_CACHE_HOME or ~/.cache."""
        self.assertEqual(tus.cache_dir("rel/dir"), os.path.abspath("rel/dir"))
        self.patch(os, "environ", {"XDG_CACHE_HOME": "/c", "HOME": "/h"})
        self.assertEqual(tus.cache_dir(), "/c/imgresume-bench/tus")
        self.patch(os, "environ", {"HOME": "/h"})
        self.assertEqual(tus.cache_dir(), "/h/.cache/imgresume-bench/tus")


class VerifyTests(SynchronousTestCase):
    """L{tus.verify_stored}: what the client says it uploaded, checked in the store."""

    def test_counts(self) -> None:
        """
        An upload counts as verified only if its file (named by its URL's
        last part) is in the store with its source's SHA-256; an error, a
        missing file and different bytes each count apart, with a reason.
        """
        store = self.mktemp()
        os.makedirs(store)
        sources = {f"/src/{n}": n.encode() * 100 for n in "abcd"}
        digests = {p: hashlib.sha256(b).hexdigest() for p, b in sources.items()}
        for uid, data in [("id-a", sources["/src/a"]), ("id-b", b"other bytes")]:
            with open(os.path.join(store, uid), "wb") as f:
                f.write(data)
        results: list[dict[str, Any]] = [
            {"path": "/src/a", "url": "http://127.0.0.1:1/files/id-a"},
            {"path": "/src/b", "url": "http://127.0.0.1:1/files/id-b/"},
            {"path": "/src/c", "url": "http://127.0.0.1:1/files/id-c"},
            {"path": "/src/d", "error": "tus: unexpected response"},
        ]
        got = tus.verify_stored(store, results, digests)
        self.assertEqual((got["verified"], got["mismatched"], got["missing"], got["errors"]),
                         (1, 1, 1, 1))
        self.assertEqual(got["problems"], ["b: stored bytes differ", "c: not stored",
                                           "d: tus: unexpected response"])

    def test_upload_id(self) -> None:
        self.assertEqual(tus.upload_id("http://h:1/files/0af3"), "0af3")
        self.assertEqual(tus.upload_id("http://h:1/files/0af3/"), "0af3")


def _stream(name: str, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"name": name, "bytes": 1 << 30, "seconds": seconds,
            "cpu": {"client": 1.0, "server": 2.0}, **extra}


def _imgresume(seconds: float) -> dict[str, Any]:
    return _stream("imgresume-direct", seconds, transfer_seconds=seconds, hash_seconds=0.0,
                   bytes_sent=1 << 30, completion_seconds=0.0, ack_interval_ms=1.0,
                   packets=1024)


def _single_results(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What the bench would hold after a single group with C{samples}."""
    groups = {"single": {"samples": samples, "notes": [],
                         "tus": {"node": "v20.20.2", "packages": tus.PACKAGES}}}
    return {"groups": groups, "summary": report.summarise(groups),
            "config": {"mode": "quick", "size": 1 << 30, "repeat": 1},
            "machine": {"cpus": 2, "loadavg_start": [1.0], "loadavg_end": [2.0]}}


class SingleReportTests(SynchronousTestCase):
    """The single group's tus rows, ratios and target in L{report}."""

    def _results(self, samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        return _single_results(samples)

    def test_ratio_and_target(self) -> None:
        """
        Every row is divided by tus's one-PATCH row (the x tus column);
        the target is imgresume direct, end to end, >= 1.5x that row, and
        its note names the chunked ratio and what tus does not do.
        """
        r = self._results({
            "rsync-append-verify": [_stream("rsync-append-verify", 1.0)],
            tus.ONE_PATCH: [_stream(tus.ONE_PATCH, 2.0, patches=1)],
            tus.CHUNKED: [_stream(tus.CHUNKED, 4.0, patches=64)],
            "imgresume-direct": [_imgresume(1.6)],
        })
        fig = r["summary"]["single"]
        self.assertAlmostEqual(fig["imgresume-direct"]["x_tus"], 1.25)
        self.assertAlmostEqual(fig[tus.CHUNKED]["x_tus"], 0.5)
        self.assertAlmostEqual(fig["rsync-append-verify"]["x_tus"], 2.0)
        [t] = [t for t in r["summary"]["targets"] if "tus-node-server" in t["target"]]
        self.assertIn(">= 1.5x", t["target"])
        self.assertAlmostEqual(t["value"], 1.25)
        self.assertIs(t["met"], False)
        self.assertIn("vs 16 MiB PATCHes 2.50x", t["also"])
        self.assertIn("no fsync, no checksum", t["also"])
        text = report.table(r)
        self.assertIn("x tus", text)
        self.assertIn("1.25x -- NOT MET", text)
        self.assertIn("1 / 64 PATCH requests\n", text)
        self.assertIn("tus-node-server: NO fsync, NO checksum", text)
        self.assertIn("@tus/server 2.4.5", text)

    def test_header_names_the_stream_size_only_when_it_ran(self) -> None:
        """
        The header gives the single stream's size when the single group
        ran, and not when only other groups did (a batch-only run).
        """
        r = self._results({"imgresume-direct": [_imgresume(2.0)]})
        self.assertIn("(quick; 1024 MiB single stream, 1 round(s);", report.table(r))
        del r["summary"]["single"]
        self.assertIn("(quick; 1 round(s);", report.table(r))
        self.assertNotIn("single stream", report.table(r).splitlines()[0])

    def test_met(self) -> None:
        r = self._results({tus.ONE_PATCH: [_stream(tus.ONE_PATCH, 3.0, patches=1)],
                           "imgresume-direct": [_imgresume(2.0)]})
        [t] = [t for t in r["summary"]["targets"] if "tus-node-server" in t["target"]]
        self.assertIs(t["met"], True)
        self.assertNotIn("PATCHes", t["also"])

    def test_without_tus(self) -> None:
        """Without tus rows the target is stated as not measured, and no x tus figure."""
        r = self._results({"imgresume-direct": [_imgresume(2.0)]})
        [t] = [t for t in r["summary"]["targets"] if "tus-node-server" in t["target"]]
        self.assertIsNone(t["met"])
        self.assertIsNone(r["summary"]["single"]["imgresume-direct"]["x_tus"])
        self.assertIn("tus-node-server + tus-js-client (one PATCH; end to end): - -- "
                      "not measured", report.table(r))


class TusDoorReportTests(SynchronousTestCase):
    """Issue 14's rows: tus-js-client to imgresume's tus door, direct and through the lb."""

    def _results(self, samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        return _single_results(samples)

    def _targets(self, r: dict[str, Any]) -> list[dict[str, Any]]:
        return [t for t in r["summary"]["targets"] if "tus over imgresume" in t["target"]]

    def test_ratios_and_targets(self) -> None:
        """
        Direct is divided by tus-node-server's one-PATCH row (>= 1.5x), the
        balancer's row by direct (>= 0.9x); the table names both rows, the
        balancer's CPU, and met / NOT MET.
        """
        lb_cpu = {"client": 1.0, "server": 2.0, "lb": 0.5}
        r = self._results({
            tus.ONE_PATCH: [_stream(tus.ONE_PATCH, 4.0, patches=1)],
            tus_imgresume.DIRECT: [_stream(tus_imgresume.DIRECT, 2.0, patches=1)],
            tus_imgresume.LB: [{**_stream(tus_imgresume.LB, 2.5, patches=1), "cpu": lb_cpu}],
            "imgresume-direct": [_imgresume(1.0)],
        })
        fig = r["summary"]["single"]
        self.assertAlmostEqual(fig[tus_imgresume.DIRECT]["x_tus"], 2.0)
        first, second = self._targets(r)
        self.assertIn("direct >= 1.5x tus-node-server", first["target"])
        self.assertAlmostEqual(first["value"], 2.0)
        self.assertIs(first["met"], True)
        self.assertIn("balancer (3 servers) >= 0.9x direct", second["target"])
        self.assertAlmostEqual(second["value"], 0.8)
        self.assertIs(second["met"], False)
        text = report.table(r)
        self.assertIn("tus-js-client -> imgresume --http, one PATCH", text)
        self.assertIn("tus-js-client -> lb -> 3 x imgresume --http", text)
        self.assertIn("1.00 / 2.00 / 0.50", text)
        self.assertIn("2.00x -- met", text)
        self.assertIn("0.80x -- NOT MET", text)
        # issue 13's target is still the only one naming tus-node-server first
        [t] = [t for t in r["summary"]["targets"]
               if t["target"].startswith("imgresume direct >= 1.5x tus-node-server")]
        self.assertIs(t["met"], True)

    def test_without_tus_node_server(self) -> None:
        """Without tus-node-server the first target is not measured; without the rows, none."""
        r = self._results({tus_imgresume.DIRECT: [_stream(tus_imgresume.DIRECT, 2.0)]})
        [t] = self._targets(r)
        self.assertIsNone(t["met"])
        self.assertEqual(self._targets(self._results({"imgresume-direct": [_imgresume(1.0)]})),
                         [])


def _batch_run(seconds: float, **extra: Any) -> dict[str, Any]:
    return {"files": 100, "bytes": 100_000, "seconds": seconds,
            "cpu": {"client": 0.5, "server": 0.2}, **extra}


class BatchReportTests(SynchronousTestCase):
    """The batch group's tus row (1,000 x 256 KiB only): files/s, ratio, storage check."""

    def test_tus_row(self) -> None:
        """
        tus counts its stored files verified and is divided by rsync like the
        others; the imgresume row is given as a ratio of it.
        """
        img = _batch_run(2.0, startup={"seconds": 0.5, "cpu": 0.3}, failures=0, verified=100,
                         missing=0, mismatched=0, extra=0, incoming_dirs=0,
                         incoming_partial=0, connections=4, hwm={"node-1": 60e6},
                         peak_rss={"node-1": 59e6}, exit=0)
        t = _batch_run(0.5, failures=1, verified=99, missing=0, mismatched=1, errors=0,
                       problems=["scan-00001.bin: stored bytes differ"],
                       in_process_seconds=0.4)
        group = {"parallel": 4, "batches": {"256k": {"files": 100, "size": 1000,
                                                     "label": "100 x 1 KiB"}},
                 "samples": {"256k": {batch.IMGRESUME: [img], batch.TUS: [t],
                                      batch.RSYNC_FSYNC: [_batch_run(1.0)]}}}
        fig, targets = batch.summarise(group)
        methods = fig["batches"]["256k"]["methods"]
        self.assertAlmostEqual(methods[batch.TUS]["x_rsync_fsync"], 2.0)
        self.assertAlmostEqual(methods[batch.TUS]["imgresume_x"], 0.25)
        self.assertEqual((methods[batch.TUS]["verified"], methods[batch.TUS]["checked"]),
                         (99, 100))
        self.assertEqual(len(targets), 2)  # issue 16's, unchanged by the tus row
        text = "\n".join(batch.table_lines(fig))
        self.assertIn("tus-js-client x4 -> tus-node-server", text)
        self.assertIn("imgresume 0.25x of this (files/s); without Node's start-up 250 "
                      "files/s", text)
        self.assertIn("stored: 99 of 100 SHA-256 ok, 0 missing, 1 wrong", text)
        self.assertIn("failed: scan-00001.bin: stored bytes differ", text)
