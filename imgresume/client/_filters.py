# -*- test-case-name: tests.client.test_collect -*-
"""
Which files found in a directory upload are taken: C{--include} and
C{--exclude} rules (rsync-style globs), checked in order, and the default
that skips hidden files.  Used by L{imgresume.client.collect_files}.
"""

from __future__ import annotations

import re
from typing import Sequence

#: A rule: C{("include", PATTERN)} or C{("exclude", PATTERN)}.
Rule = tuple[str, str]


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """
    An rsync-style glob as a regular expression for a whole "/"-separated
    path: C{*} is any run of characters but C{/}, C{?} one character but
    C{/}, C{**} anything (C{/} too; C{**/} also nothing), C{[...]} a class
    (C{[!...]} its complement).  As in the shell, no wildcard matches the
    C{.} that starts a component: a hidden name must be spelt out.
    """
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        start = i == 0 or pattern[i - 1] == "/"  # a component starts here
        visible = "(?!\\.)" if start else ""
        if pattern.startswith("**/", i):
            out.append("(?:(?!\\.)[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(f"(?:{visible}[^/]*(?:/(?!\\.)[^/]*)*)")
            i += 2
        elif c == "*":
            out.append(f"{visible}[^/]*")
            i += 1
        elif c == "?":
            out.append(f"{visible}[^/]")
            i += 1
        elif c == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            if body.startswith("!"):
                body = "^/" + body[1:]
            out.append(visible + "[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


class _Rule:
    """One compiled rule."""

    def __init__(self, kind: str, pattern: str) -> None:
        if kind not in ("include", "exclude"):
            raise ValueError(f"a filter rule is include or exclude, not {kind!r}")
        if not pattern.strip("/"):
            raise ValueError(f"an empty --{kind} pattern")
        self.include = kind == "include"
        self.text = f"--{kind} {pattern}"
        self.directories_only = pattern.endswith("/")
        body = pattern.rstrip("/")
        self.whole_path = "/" in body or "**" in body
        self.regex = glob_to_regex(body.lstrip("/"))

    def matches(self, components: Sequence[str], directory: bool = False) -> bool:
        """
        Whether the rule matches the file (or, if C{directory}, the
        directory) at C{components}, or a directory above it.
        """
        for depth in range(1, len(components) + 1):
            if self.directories_only and depth == len(components) and not directory:
                break
            subject = "/".join(components[:depth]) if self.whole_path else components[depth - 1]
            if self.regex.match(subject):
                return True
        return False


class FileFilter:
    """
    The rules for the files found below a directory PATH, each known by
    its path relative to that directory ("/"-separated).

    The first rule, in the order given, that matches a file decides: taken
    for C{include}, skipped for C{exclude}.  A pattern without C{/} (but a
    trailing one) and without C{**} is matched against the file's name and
    the name of every directory above it; any other pattern against the
    relative path of the file and of every directory above it (a leading
    C{/} changes nothing: patterns start at the directory given).  A
    pattern ending in C{/} matches directories only; no wildcard matches the
    C{.} that starts a hidden name.  A file that no rule
    matches is taken, unless a component of its relative path starts with
    C{.} (a hidden file, or a file in a hidden directory): that one is
    skipped.

    @raise ValueError: a rule that is neither include nor exclude, or an
        empty pattern.
    """

    def __init__(self, rules: Sequence[Rule] = ()) -> None:
        self.rules = [_Rule(kind, pattern) for kind, pattern in rules]

    def skipped(self, relative: str) -> str | None:
        """Why the file at C{relative} is skipped, or None if it is taken."""
        components = relative.split("/")
        for rule in self.rules:
            if rule.matches(components):
                return None if rule.include else rule.text
        if any(c.startswith(".") for c in components):
            return "hidden"
        return None

    def pruned(self, relative: str) -> str | None:
        """
        Why no file below the directory at C{relative} can be taken (it is
        hidden or excluded, and no include rule could take a file back), or
        None: the walk need not enter it.
        """
        if any(rule.include for rule in self.rules):
            return None
        components = relative.split("/")
        for rule in self.rules:
            if rule.matches(components, directory=True):
                return rule.text
        if any(c.startswith(".") for c in components):
            return "hidden"
        return None
