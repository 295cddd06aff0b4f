# -*- test-case-name: tests.client.test_collect -*-
"""
Tests for L{imgresume.client.collect_files}: from files and directories to
the files of a batch and their remote names, with the names the server
would refuse, duplicates and things that are not regular files left out
with a reason.
"""

from __future__ import annotations

import os
import unicodedata

from twisted.trial.unittest import SynchronousTestCase

from imgresume.client import BatchItem, RefusedFile, collect_files


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
        left out with the rule's message; the other files are kept.
        """
        hidden, device, _ = self.touch("d/.DS_Store", "d/sub/CON.tif", "d/ok.tif")
        collected = collect_files([os.path.join(self.root, "d")])
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
