# -*- test-case-name: tests.client.test_collect -*-
"""
From command-line arguments (files and directories) to the files of a
batch and their remote names, checked against the server's name rules
(docs/protocol.md section 6) before anything is sent.
"""

from __future__ import annotations

import os
import stat
from typing import Sequence

import attrs

from imgresume.client._batch import BatchItem
from imgresume.client._filters import FileFilter, Rule
from imgresume.errors import InvalidName
from imgresume.names import validate_name


@attrs.frozen
class RefusedFile:
    """
    A path a batch leaves out, and why: its remote name breaks the rules,
    another file of the batch has the same remote name, it is not a regular
    file, or its directory cannot be read.  C{name} is None when no name
    was made.
    """

    path: str
    name: str | None
    reason: str


@attrs.frozen
class SkippedFile:
    """
    A file found in a directory that a batch skips, by choice rather than
    for a fault: C{reason} is C{"hidden"} or the rule that excluded it
    (C{"--exclude *.tmp"}).
    """

    path: str
    reason: str


@attrs.frozen
class CollectedFiles:
    """
    The result of L{collect_files}: the files to upload, the ones refused,
    and the ones skipped (hidden or excluded).
    """

    items: list[BatchItem]
    refused: list[RefusedFile]
    skipped: list[SkippedFile] = attrs.field(factory=list)


def remote_name(prefix: str | None, relative: str) -> str:
    """
    The remote name of a file at C{relative} (a local relative path) under
    C{prefix} ("/"-separated, or None), NFC-normalised.

    @raise InvalidName: the name breaks the server's rules.
    """
    parts = relative.split(os.sep)
    if os.altsep:
        parts = [p for part in parts for p in part.split(os.altsep)]
    name = "/".join(parts)
    if prefix:
        name = f"{prefix.rstrip('/')}/{name}"
    return validate_name(name)


def collect_files(
    paths: Sequence[str],
    *,
    prefix: str | None = None,
    name: str | None = None,
    filters: Sequence[Rule] = (),
) -> CollectedFiles:
    """
    The files to upload for C{paths}, as C{imgresume upload} takes them.

    A regular file is uploaded as its base name; a directory, as every
    regular file below it (recursively, sorted by path), each named by its
    path relative to the directory with "/" between components.  With
    C{prefix}, every name goes below that remote directory.  C{name}, for a
    single file, replaces its name altogether.  Symbolic links to files are
    followed; links to directories are not (no loops) and are refused.

    In a directory, hidden files (a component of the relative path starting
    with C{.}) are skipped, and C{filters}, C{("include", PATTERN)} and
    C{("exclude", PATTERN)} rules checked in order, choose among the files
    (see L{imgresume.client._filters.FileFilter}); what they leave out is
    in C{skipped}.  A file named in C{paths} itself is always taken.

    Names are checked with the server's rules.  A file whose name is
    refused, or whose name an earlier file of C{paths} already has, is not
    uploaded: it is in C{refused} with the reason, as is anything that is
    not a regular file, and a path that does not exist.

    @raise ValueError: C{name} with anything but a single file, or a
        malformed filter rule.
    """
    if name is not None and (len(paths) != 1 or os.path.isdir(paths[0])):
        raise ValueError("a name is for a single file")
    chooser = FileFilter(filters)
    items: list[BatchItem] = []
    refused: list[RefusedFile] = []
    skipped: list[SkippedFile] = []
    owners: dict[str, str] = {}

    def add(path: str, relative: str) -> None:
        size = _regular_file_size(path)
        if size is None:
            refused.append(RefusedFile(path, None, "not a regular file"))
            return
        try:
            remote = validate_name(name) if name is not None else remote_name(prefix, relative)
        except InvalidName as e:
            refused.append(RefusedFile(path, None, e.message))
            return
        if remote in owners:
            refused.append(RefusedFile(
                path, remote, f"its remote name {remote} is taken by {owners[remote]} "
                "in this batch"))
            return
        owners[remote] = path
        items.append(BatchItem(path, remote, size=size))

    for path in paths:
        if not os.path.lexists(path):
            refused.append(RefusedFile(path, None, "no such file or directory"))
            continue
        if not os.path.isdir(path):
            add(path, os.path.basename(path))
            continue

        def unreadable(error: OSError, top: str = path) -> None:
            refused.append(RefusedFile(
                error.filename or top, None,
                f"cannot read the directory: {error.strerror or error}"))

        found: list[tuple[tuple[str, ...], str, str]] = []
        for directory, subdirectories, files in os.walk(path, onerror=unreadable):
            for sub in list(subdirectories):
                below = os.path.relpath(os.path.join(directory, sub), path)
                reason = chooser.pruned("/".join(below.split(os.sep)))
                if reason is not None:
                    subdirectories.remove(sub)
                    skipped.append(SkippedFile(os.path.join(directory, sub) + os.sep, reason))
            for link in [d for d in subdirectories if os.path.islink(os.path.join(directory, d))]:
                subdirectories.remove(link)
                refused.append(RefusedFile(
                    os.path.join(directory, link), None,
                    "a symbolic link to a directory (not followed)"))
            for leaf in files:
                full = os.path.join(directory, leaf)
                relative = os.path.relpath(full, path)
                found.append((tuple(relative.split(os.sep)), full, relative))
        for components, full, relative in sorted(found):
            reason = chooser.skipped("/".join(components))
            if reason is not None:
                skipped.append(SkippedFile(full, reason))
            else:
                add(full, relative)
    return CollectedFiles(items, refused, skipped)


def _regular_file_size(path: str) -> int | None:
    """The size of the regular file at C{path}; None if it is not one."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # a dangling link, or gone already
    return st.st_size if stat.S_ISREG(st.st_mode) else None
