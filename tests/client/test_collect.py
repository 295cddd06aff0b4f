# -*- test-case-name: tests.client.test_collect -*-
"""
Tests for L{imgresume.client.collect_files}: from files and directories to
the files of a batch and their remote names, with the names the server
would refuse, duplicates, missing paths and things that are not regular
files left out with a reason; hidden files skipped and C{--include} and
C{--exclude} rules (L{imgresume.client._filters}); and the plan of a dry
run (L{imgresume.client.Uploader.plan}).
"""

from __future__ import annotations

import os
import unicodedata

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imgresume.client import (
    BatchItem,
    Journal,
    RefusedFile,
    SkippedFile,
    Uploader,
    collect_files,
)
from imgresume.client._filters import glob_to_regex
from imgresume.client._journal import journal_key
from imgresume.client._source import Fingerprint
from tests.support.runners import sync_run


class CollectFilesTests(SynchronousTestCase):
    """L{collect_files} on a directory tree in the test's temporary directory."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    def touch(self, *relative: str) -> list[str]:
        """Create empty files at C{relative} paths below the root; their paths."""
        paths = []
        for rel in relative:
            path = os.path.join(self.root, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
            paths.append(path)
        return paths

    def test_directory(self) -> None:
        """
        Every regular file below a directory, depth first in sorted order,
        named by its path relative to the directory with "/" between parts.
        """
        self.touch("scans/b.tif", "scans/a.tif", "scans/2026/03/c.tif", "scans/2026/d.tif")
        collected = collect_files([os.path.join(self.root, "scans")])
        self.assertEqual([i.name for i in collected.items],
                         ["2026/03/c.tif", "2026/d.tif", "a.tif", "b.tif"])
        self.assertEqual(collected.items[0],
                         BatchItem(os.path.join(self.root, "scans", "2026", "03", "c.tif"),
                                   "2026/03/c.tif"))
        self.assertEqual(collected.refused, [])

    def test_files_and_prefix(self) -> None:
        """
        A file is named by its base name; a prefix puts every name below a
        remote directory (a trailing "/" on it is fine).
        """
        [single] = self.touch("x/one.tif")
        self.touch("dir/two.tif")
        collected = collect_files([single, os.path.join(self.root, "dir")],
                                  prefix="batch-7/")
        self.assertEqual([i.name for i in collected.items],
                         ["batch-7/one.tif", "batch-7/two.tif"])

    def test_refused_names(self) -> None:
        """
        Names the server's rules refuse (hidden, a Windows device name) are
        left out with the rule's message; the other files are kept.  (A
        hidden file is skipped before its name is checked unless a rule
        includes it, as here.)
        """
        hidden, device, _ = self.touch("d/.DS_Store", "d/sub/CON.tif", "d/ok.tif")
        collected = collect_files([os.path.join(self.root, "d")],
                                  filters=[("include", ".DS_Store")])
        self.assertEqual([i.name for i in collected.items], ["ok.tif"])
        [first, second] = collected.refused
        self.assertEqual((first.path, first.name), (hidden, None))
        self.assertIn("starts with '.'", first.reason)
        self.assertEqual(second.path, device)
        self.assertIn("reserved Windows device name", second.reason)

    def test_duplicate_names(self) -> None:
        """
        Two directories with a file of the same relative path: the second
        is refused, naming the first.
        """
        one, two = self.touch("one/a.tif", "two/a.tif")
        collected = collect_files([os.path.join(self.root, "one"),
                                   os.path.join(self.root, "two")])
        self.assertEqual(collected.items, [BatchItem(one, "a.tif")])
        self.assertEqual(collected.refused, [RefusedFile(
            two, "a.tif", f"its remote name a.tif is taken by {one} in this batch")])

    def test_links(self) -> None:
        """
        A link to a file is followed (uploaded as the link's name); a link
        to a directory is not, and a dangling link is not a regular file:
        both are refused.
        """
        [target] = self.touch("elsewhere/t.tif")
        self.touch("d/real.tif")
        d = os.path.join(self.root, "d")
        os.symlink(target, os.path.join(d, "linked.tif"))
        os.symlink(os.path.join(self.root, "elsewhere"), os.path.join(d, "dirlink"))
        os.symlink(os.path.join(self.root, "nowhere"), os.path.join(d, "dangling.tif"))
        collected = collect_files([d])
        self.assertEqual([i.name for i in collected.items], ["linked.tif", "real.tif"])
        reasons = {os.path.basename(r.path): r.reason for r in collected.refused}
        self.assertEqual(reasons, {
            "dirlink": "a symbolic link to a directory (not followed)",
            "dangling.tif": "not a regular file",
        })

    def test_not_a_regular_file(self) -> None:
        """A named pipe, given directly or found in a directory, is refused."""
        fifo = os.path.join(self.root, "pipe")
        os.mkfifo(fifo)
        collected = collect_files([fifo, self.root])
        self.assertEqual(collected.items, [])
        self.assertEqual([r.reason for r in collected.refused], ["not a regular file"] * 2)

    def test_unicode_names_normalised(self) -> None:
        """A decomposed (NFD) file name becomes the NFC name the server stores."""
        decomposed = unicodedata.normalize("NFD", "scan-\u00e9.tif")
        self.touch(f"d/{decomposed}")
        [item] = collect_files([os.path.join(self.root, "d")]).items
        self.assertEqual(item.name, "scan-\u00e9.tif")

    def test_explicit_name(self) -> None:
        """
        A name for a single file replaces its base name, and is checked
        too; with a directory or several paths it is a ValueError.
        """
        [path] = self.touch("a.tif")
        self.assertEqual(collect_files([path], name="scans/b.tif").items,
                         [BatchItem(path, "scans/b.tif")])
        [refused] = collect_files([path], name="../b.tif").refused
        self.assertIn("'..'", refused.reason)
        self.assertRaises(ValueError, collect_files, [self.root], name="x.tif")
        self.assertRaises(ValueError, collect_files, [path, path], name="x.tif")

    def test_empty_directory(self) -> None:
        """An empty directory gives nothing, and refuses nothing."""
        collected = collect_files([self.root])
        self.assertEqual((collected.items, collected.refused), ([], []))

    def test_no_such_file(self) -> None:
        """A path that does not exist is refused as such; the others are kept."""
        [path] = self.touch("a.tif")
        missing = os.path.join(self.root, "nope.tif")
        collected = collect_files([missing, path])
        self.assertEqual(collected.items, [BatchItem(path, "a.tif")])
        self.assertEqual(collected.refused,
                         [RefusedFile(missing, None, "no such file or directory")])


class FilterTests(SynchronousTestCase):
    """Hidden files, --include and --exclude in directory uploads."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        for rel in ["a.tif", "b.jpg", "sub/c.tif", "sub/deep/d.tif", ".DS_Store",
                    ".git/config", "sub/.hidden.tif", "tmp/e.tif"]:
            path = os.path.join(self.root, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()

    def names(self, *rules: tuple[str, str]) -> list[str]:
        """The remote names of the files taken with C{rules}."""
        collected = collect_files([self.root], filters=list(rules))
        self.assertEqual(collected.refused, [])
        return [i.name for i in collected.items]

    def test_hidden_skipped(self) -> None:
        """
        Hidden files and everything in hidden directories are skipped (a
        hidden directory is not even entered); each is reported as such.
        """
        collected = collect_files([self.root])
        self.assertEqual([i.name for i in collected.items],
                         ["a.tif", "b.jpg", "sub/c.tif", "sub/deep/d.tif", "tmp/e.tif"])
        self.assertEqual(collected.refused, [])
        self.assertEqual(sorted(collected.skipped, key=lambda s: s.path), [
            SkippedFile(os.path.join(self.root, ".DS_Store"), "hidden"),
            SkippedFile(os.path.join(self.root, ".git") + os.sep, "hidden"),
            SkippedFile(os.path.join(self.root, "sub", ".hidden.tif"), "hidden"),
        ])

    def test_file_named_is_taken(self) -> None:
        """A hidden FILE named directly is taken (and its name checked as usual)."""
        collected = collect_files([os.path.join(self.root, ".DS_Store")])
        self.assertEqual(collected.skipped, [])
        [refused] = collected.refused
        self.assertIn("starts with '.'", refused.reason)

    def test_first_rule_decides(self) -> None:
        """
        Rules are checked in order; the first that matches decides (a
        wildcard rule leaves hidden files to the default: skipped).
        """
        self.assertEqual(self.names(("include", "*.tif"), ("exclude", "*")),
                         ["a.tif", "sub/c.tif", "sub/deep/d.tif", "tmp/e.tif"])
        self.assertEqual(self.names(("exclude", "*"), ("include", "*.tif")), [])
        self.assertEqual(self.names(("exclude", "tmp"), ("include", "*.tif"), ("exclude", "*")),
                         ["a.tif", "sub/c.tif", "sub/deep/d.tif"])

    def test_patterns(self) -> None:
        """
        A name pattern matches the file's name or a directory's; a pattern
        with / or ** the relative path of the file or a directory above it;
        a trailing / directories only; * stays within a component.
        """
        self.assertEqual(self.names(("exclude", "sub")), ["a.tif", "b.jpg", "tmp/e.tif"])
        self.assertEqual(self.names(("exclude", "sub/deep")),
                         ["a.tif", "b.jpg", "sub/c.tif", "tmp/e.tif"])
        self.assertEqual(self.names(("exclude", "/sub/*.tif")),
                         ["a.tif", "b.jpg", "sub/deep/d.tif", "tmp/e.tif"])
        self.assertEqual(self.names(("exclude", "**/d.tif")),
                         ["a.tif", "b.jpg", "sub/c.tif", "tmp/e.tif"])
        self.assertEqual(self.names(("exclude", "a.tif/")),
                         ["a.tif", "b.jpg", "sub/c.tif", "sub/deep/d.tif", "tmp/e.tif"])
        self.assertEqual(self.names(("include", "sub/**"), ("exclude", "*")),
                         ["sub/c.tif", "sub/deep/d.tif"])
        self.assertEqual(self.names(("exclude", "[ab].*")),
                         ["sub/c.tif", "sub/deep/d.tif", "tmp/e.tif"])
        self.assertEqual(self.names(("exclude", "[!ab].*"), ("exclude", "tmp")),
                         ["a.tif", "b.jpg"])

    def test_include_hidden(self) -> None:
        """An include rule takes a hidden file back (the name rules then refuse it)."""
        collected = collect_files([self.root], filters=[("include", ".git/")])
        self.assertEqual([r.path for r in collected.refused],
                         [os.path.join(self.root, ".git", "config")])

    def test_glob(self) -> None:
        """
        The glob syntax, as regular expressions over "/"-separated paths;
        no wildcard matches the dot that starts a hidden name.
        """
        for pattern, matches, misses in [
            ("*.tif", ["a.tif", "a..tif"], [".tif", ".a.tif", "a/b.tif", "a.tiff"]),
            (".*", [".tif", ".git"], ["a.tif", ".a/b"]),
            ("?.tif", ["a.tif"], ["ab.tif", "/.tif", "..tif"]),
            ("**", ["a", "a/b/c"], [".a", "a/.b/c"]),
            ("a/**/z", ["a/z", "a/b/z", "a/b/c/z"], ["az", "b/a/z", "a/.b/z"]),
            ("[a-c]x", ["ax", "cx"], ["dx", "/x"]),
            ("[!a]x", ["bx"], ["ax", ".x", "/x"]),
            ("a+b(c)", ["a+b(c)"], ["aab(c)"]),
        ]:
            regex = glob_to_regex(pattern)
            for subject in matches:
                self.assertTrue(regex.match(subject), (pattern, subject))
            for subject in misses:
                self.assertFalse(regex.match(subject), (pattern, subject))

    def test_bad_rules(self) -> None:
        """An empty pattern or an unknown kind of rule is a ValueError."""
        self.assertRaises(ValueError, collect_files, [self.root], filters=[("include", "/")])
        self.assertRaises(ValueError, collect_files, [self.root], filters=[("keep", "*.tif")])


class PlanTests(SynchronousTestCase):
    """L{Uploader.plan}: what a batch would do, from the files and the journal only."""

    def test_plan(self) -> None:
        """
        Files unknown to the journal would be sent; an unfinished entry
        resumed; a complete one confirmed; a missing file is unreadable.
        With restart, everything would be sent.  Nothing connects.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        paths = []
        for name in ("new.tif", "part.tif", "done.tif"):
            paths.append(os.path.join(work, name))
            with open(paths[-1], "wb") as f:
                f.write(name.encode() * 100)
        journal = Journal(os.path.join(work, "journal.json"))

        def key(path: str) -> str:
            fingerprint = Fingerprint.of(path, os.stat(path))
            return journal_key(fingerprint, "tcp:h:1", os.path.basename(path))

        journal.remember(key(paths[1]), "1" * 32, None)
        journal.remember(key(paths[2]), "2" * 32, "ab" * 32, complete=True)
        uploader = Uploader("tcp:h:1", reactor=Clock(), journal=journal, run=sync_run)
        missing = os.path.join(work, "gone.tif")
        planned = self.successResultOf(uploader.plan([*paths, BatchItem(missing, "x.tif")]))
        self.assertEqual([(p.name, p.action, p.size, p.upload_id) for p in planned], [
            ("new.tif", "send", 700, None),
            ("part.tif", "resume", 800, "1" * 32),
            ("done.tif", "stored", 800, "2" * 32),
            ("x.tif", "unreadable", None, None),
        ])
        self.assertEqual(planned[3].reason, "No such file or directory")
        again = self.successResultOf(uploader.plan(paths, restart=True))
        self.assertEqual([p.action for p in again], ["send"] * 3)
