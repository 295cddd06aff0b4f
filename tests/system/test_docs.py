# -*- test-case-name: tests.system.test_docs -*-
"""
The documentation is held to the code.

  - L{LinkTests}: every relative link in C{README.md} and C{docs/*.md} names
    a file that exists (and a heading that exists, when it has an anchor);
    the README links every file under C{docs/}; C{docs/testing.md} names
    every test module.
  - L{CommandLineTests}: every C{twistd ... imgresume ...}, C{twistd ...
    imgresume-lb ...} and C{imgresume COMMAND ...} line in a fenced C{sh}
    block of the docs, and the C{ExecStart=} lines of the example systemd
    units with the environment files C{docs/operations.md} shows, parse
    with the real option parsers, so a renamed or removed option, or a
    command the secure-by-default rule refuses, fails here.
  - L{LogEventTests}: the log events C{docs/operations.md} tells operators
    to alert on are format strings the code really logs.
  - L{QuickStartTests}: the README's quick start, run as written (free ports
    and a temporary storage directory instead of the fixed ones, a smaller
    test file): three servers and a balancer as real processes, the
    documented C{imgresume upload} line, the stored file checked, and
    everything stopped with SIGTERM.

The HAProxy example configuration is run by L{tests.system.test_haproxy}; it is not
run again here.
"""

from __future__ import annotations

import ast
import getopt
import hashlib
import inspect
import os
import re
import shlex
import signal
import subprocess
import sys
import unicodedata

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from imgresume.testing import free_tcp_port, wait_until_connectable
from tests.support.processes import REPO_ROOT

DOCS = os.path.join(REPO_ROOT, "docs")
README = os.path.join(REPO_ROOT, "README.md")
OPERATIONS = os.path.join(DOCS, "operations.md")
EXAMPLES = os.path.join(DOCS, "examples")

#: Fenced blocks whose lines are shell commands.
SHELL_LANGUAGES = {"sh", "bash", "shell"}

#: Commands in docs this suite may not edit that the option parsers refuse
#: today, with the reason.  Each entry must still fail (so that it is
#: removed once the doc is fixed); any other failing command fails the test.
KNOWN_DRIFT: dict[tuple[str, str], str] = {}


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def rel(path: str) -> str:
    """A path relative to the repository root, for messages."""
    return os.path.relpath(path, REPO_ROOT)


def markdown_files() -> list[str]:
    """README.md and every Markdown file in docs/."""
    return [README] + sorted(
        os.path.join(DOCS, name) for name in os.listdir(DOCS) if name.endswith(".md")
    )


# Markdown ------------------------------------------------------------------

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)")


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """
    The fenced code blocks of a Markdown text: (language, line number of the
    first line inside, lines), in order.
    """
    blocks: list[tuple[str, int, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        body: list[str] = []
        start = i + 2
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            i += 1
        blocks.append((lang.lower(), start, body))
        i += 1
    return blocks


def prose(text: str) -> str:
    """The text without fenced blocks and inline code spans (where no link is)."""
    out, inside, fence = [], False, ""
    for line in text.splitlines():
        m = _FENCE.match(line)
        if m and not inside:
            inside, fence = True, m.group(2)
            out.append("")
            continue
        if inside:
            if line.strip().startswith(fence):
                inside = False
            out.append("")
            continue
        out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line))
    return "\n".join(out)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown text."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_keeping_code(text).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = heading_slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        result.add(slug if n == 0 else f"{slug}-{n}")
    return result


def prose_keeping_code(text: str) -> str:
    """The text without fenced blocks (inline code stays: it is in headings)."""
    out, inside, fence = [], False, ""
    for line in text.splitlines():
        m = _FENCE.match(line)
        if m and not inside:
            inside, fence = True, m.group(2)
            continue
        if inside:
            if line.strip().startswith(fence):
                inside = False
            continue
        out.append(line)
    return "\n".join(out)


def heading_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to -."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    slug = "".join(
        ch for ch in heading.lower()
        if ch in " -_" or unicodedata.category(ch)[0] in "LN"
    )
    return slug.replace(" ", "-")


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def links(text: str) -> list[str]:
    """The targets of the inline links and images in a Markdown text."""
    return _LINK.findall(prose(text))


# Command lines --------------------------------------------------------------


def shell_commands(path: str) -> list[tuple[int, str]]:
    """
    The command lines of the fenced shell blocks of a Markdown file:
    (line number, command), continuation lines joined, comment lines left out.
    """
    commands = []
    for lang, start, body in fenced_blocks(read(path)):
        if lang not in SHELL_LANGUAGES:
            continue
        current, first = "", 0
        for offset, line in enumerate(body):
            if not current:
                first = start + offset
                if line.lstrip().startswith("#") or not line.strip():
                    continue
            stripped = line.rstrip()
            if stripped.endswith("\\"):
                current += stripped[:-1] + " "
                continue
            current += stripped
            commands.append((first, " ".join(current.split())))
            current = ""
        if current:
            commands.append((first, " ".join(current.split())))
    return commands


def split_simple_commands(line: str) -> list[list[str]]:
    """
    Split a shell line into simple commands (at pipes, lists, C{&}), with
    redirections and leading variable assignments dropped.
    """
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    commands: list[list[str]] = [[]]
    skip_next = False
    for i, token in enumerate(tokens):
        if skip_next:
            skip_next = False
            continue
        following = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token.isdigit() and following.startswith((">", "<")):
            continue  # the descriptor of a redirection (2>...)
        if token and all(ch in "();<>|&" for ch in token):
            if token.startswith((">", "<")):
                skip_next = True  # the redirection's target
                continue
            commands.append([])
            continue
        commands[-1].append(token)
    result = []
    for words in commands:
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            words = words[1:]
        while words and words[0] in ("sudo", "exec", "env", "runuser"):
            words = words[1:]
            while words and words[0].startswith("-"):
                option = words.pop(0)
                if option in ("-u", "--user", "-g", "--group") and words:
                    words.pop(0)
                if option == "--":
                    break
        if words:
            result.append(words)
    return result


def command_kind(words: list[str]) -> tuple[str, list[str]] | None:
    """
    Classify a simple command: C{("twistd", args)} for a twistd line that runs
    the imgresume or imgresume-lb plugin, C{("imgresume", args)} for the
    imgresume command (however it is started), or None.
    """
    program = os.path.basename(words[0])
    if program == "twistd":
        if "imgresume" in words or "imgresume-lb" in words:
            return "twistd", words[1:]
        return None
    if program == "imgresume":
        return "imgresume", words[1:]
    if program.startswith("python") and words[1:3] == ["-m", "imgresume"]:
        return "imgresume", words[3:]
    return None


class Sandbox:
    """
    The real things a command line's placeholders and paths stand for while
    it is parsed: a storage directory, a key file, local files to upload.
    """

    def __init__(self, directory: str) -> None:
        from imgresume.keys import add_client

        self.directory = directory
        self.storage = os.path.join(directory, "storage")
        os.makedirs(self.storage, exist_ok=True)
        self.keys = os.path.join(directory, "keys.json")
        if not os.path.exists(self.keys):
            add_client(self.keys, "scanner-7")
        self.upload = os.path.join(directory, "scan.tif")
        with open(self.upload, "wb") as f:
            f.write(b"II*\x00")

    def storage_and_keys(self, args: list[str], *, keys: bool) -> list[str]:
        """Point --storage (and, for servers, --keys) at real things."""
        names = {"--storage": self.storage, "-s": self.storage}
        if keys:
            names.update({"--keys": self.keys, "-k": self.keys})
        out: list[str] = []
        it = iter(args)
        for arg in it:
            if arg in names:
                out += [arg, names[arg]]
                next(it, None)
            elif "=" in arg and arg.split("=", 1)[0] in names and arg.startswith("--"):
                out.append(f"{arg.split('=', 1)[0]}={names[arg.split('=', 1)[0]]}")
            else:
                out.append(arg)
        return out

    def placeholders(self, args: list[str]) -> list[str]:
        """Replace the usual placeholders of synopsis-like examples."""
        table = {"DIR": self.storage, "DURATION": "7d", "UPLOAD_ID": "0" * 32,
                 "ENDPOINT": "tcp:127.0.0.1:7000"}
        return [table.get(arg, arg) for arg in args]


def parse_twistd(args: list[str], sandbox: Sandbox) -> None:
    """Parse a twistd command line (after C{twistd}) as twistd would."""
    from twisted.scripts.twistd import ServerOptions

    at = next(i for i, a in enumerate(args) if a in ("imgresume", "imgresume-lb"))
    plugin_args = sandbox.placeholders(args[at + 1:])
    if args[at] == "imgresume":
        plugin_args = sandbox.storage_and_keys(plugin_args, keys=True)
    ServerOptions().parseOptions(args[:at + 1] + plugin_args)


def parse_imgresume(args: list[str], sandbox: Sandbox) -> None:
    """Parse an C{imgresume} command line (after the program) as the command would."""
    from imgresume.cli import Options

    args = sandbox.storage_and_keys(sandbox.placeholders(args), keys=False)
    if args and args[0] == "upload":
        # The files must exist: every FILE becomes a real one.
        from imgresume.cli._upload import UploadOptions

        probe = UploadOptions()
        try:
            _, files = getopt.gnu_getopt(args[1:], probe.shortOpt, probe.longOpt)
        except getopt.error as e:
            raise usage.UsageError(str(e))
        files_left = list(files)
        rewritten = [args[0]]
        for arg in args[1:]:
            if files_left and arg == files_left[0]:
                files_left.pop(0)
                rewritten.append(sandbox.upload)
            else:
                rewritten.append(arg)
        args = rewritten
    Options().parseOptions(args)


def documented_commands() -> list[tuple[str, int, str, str, list[str]]]:
    """
    Every imgresume-related command line of the docs' shell blocks:
    (file, line, the whole line, kind, arguments).
    """
    found = []
    for path in markdown_files():
        for line_no, line in shell_commands(path):
            if "..." in line or "imgresume" not in line:
                continue
            try:
                simple = split_simple_commands(line)
            except ValueError:
                continue
            for words in simple:
                kind = command_kind(words)
                if kind is None:
                    continue
                if any(w.startswith("[") or w in ("--help", "--version") for w in words):
                    continue
                if kind[0] == "twistd" and ("-y" in words or "-ny" in words):
                    continue
                found.append((rel(path), line_no, line, kind[0], kind[1]))
    return found


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads an EnvironmentFile (quotes removed)."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def expand_exec_start(line: str, env: dict[str, str], instance: str) -> list[str]:
    """
    An ExecStart= command line as systemd runs it: C{%i} is the instance,
    C{${VAR}} one word, C{$VAR} split at white space.
    """
    words = []
    for word in shlex.split(line.replace("%i", instance)):
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            words += env.get(m.group(1), "").split()
            continue
        words.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                            lambda m: env.get(m.group(1), ""), word))
    return words


def unit_directives(text: str) -> dict[str, list[str]]:
    """The directives of a unit file, continuation lines joined."""
    directives: dict[str, list[str]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith(("#", ";", "["))):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        key, _, value = current.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
        current = ""
    return directives


def env_examples() -> dict[str, dict[str, str]]:
    """
    The environment files docs/operations.md shows, by path: fenced blocks
    whose first line is a comment naming a file under /etc/imgresume/.
    """
    found = {}
    for _, _, body in fenced_blocks(read(OPERATIONS)):
        if body and re.match(r"#\s*/etc/imgresume/\S+\.env\s*$", body[0]):
            found[body[0].lstrip("# ").strip()] = parse_env_file("\n".join(body[1:]))
    return found


# Log events -----------------------------------------------------------------


def logged_formats() -> set[str]:
    """Every format string the imgresume package passes to a Logger method."""
    formats = set()
    package = os.path.join(REPO_ROOT, "imgresume")
    for directory, _, names in os.walk(package):
        for name in names:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(read(os.path.join(directory, name)))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("debug", "info", "warn", "error", "critical",
                                           "failure")
                ):
                    for arg in node.args[:2]:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            formats.add(arg.value)
    return formats


def alert_events() -> list[str]:
    """
    The log event texts in the alert table of docs/operations.md: the code
    spans of the first column of the table under the heading "Log events to
    alert on".
    """
    text = read(OPERATIONS)
    m = re.search(r"^#+ Log events to alert on\s*$(.*?)(?=^#)", text,
                  re.MULTILINE | re.DOTALL)
    if m is None:
        return []
    events = []
    for line in m.group(1).splitlines():
        if not line.startswith("|") or line.startswith(("|---", "| event")):
            continue
        first = line.split(" | ")[0]
        events += re.findall(r"`([^`]+)`", first)
    return events


# Tests ----------------------------------------------------------------------


class LinkTests(SynchronousTestCase):
    """Links between the docs, and the lists of docs and tests."""

    def test_markdown_parsing(self) -> None:
        """
        The helpers find links outside code only, and compute GitHub's
        heading anchors.
        """
        text = ("# The client's address (`--send-proxy`)\n"
                "See [a](a.md#x) and ![i](img.png), not `[b](b.md)`.\n"
                "```sh\n[c](c.md)\n```\n## The client's address (`--send-proxy`)\n")
        self.assertEqual(links(text), ["a.md#x", "img.png"])
        self.assertEqual(anchors(text), {"the-clients-address---send-proxy",
                                         "the-clients-address---send-proxy-1"})

    def test_relative_links_resolve(self) -> None:
        """
        Every relative link in README.md and docs/*.md names an existing file
        (or directory), and its anchor, if any, names a heading of the
        Markdown file it points to.
        """
        problems = []
        checked = 0
        for path in markdown_files():
            own = anchors(read(path))
            for target in links(read(path)):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue  # http:, https:, mailto: ...
                checked += 1
                file_part, _, anchor = target.partition("#")
                if not file_part:
                    if anchor not in own:
                        problems.append(f"{rel(path)}: #{anchor}: no such heading")
                    continue
                full = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                if not os.path.exists(full):
                    problems.append(f"{rel(path)}: {target}: {rel(full)} does not exist")
                elif anchor and full.endswith(".md") and anchor not in anchors(read(full)):
                    problems.append(f"{rel(path)}: {target}: no heading #{anchor} "
                                    f"in {rel(full)}")
        self.assertEqual(problems, [])
        self.assertGreater(checked, 20)

    def test_readme_links_every_doc(self) -> None:
        """
        The README's documentation list links every file under docs/ (the
        examples included).
        """
        linked = {
            os.path.normpath(os.path.join(REPO_ROOT, target.partition("#")[0]))
            for target in links(read(README))
        }
        missing = []
        for directory, dirs, names in os.walk(DOCS):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                full = os.path.join(directory, name)
                if not name.startswith(".") and full not in linked:
                    missing.append(rel(full))
        self.assertEqual(sorted(missing), [])

    def test_testing_doc_names_every_test_module(self) -> None:
        """
        docs/testing.md names every test module under tests/, by its path
        below tests/ without C{.py} (C{test_errors}, C{protocol/test_frames}).
        """
        text = read(os.path.join(DOCS, "testing.md"))
        tests = os.path.join(REPO_ROOT, "tests")
        modules = sorted(
            os.path.relpath(os.path.join(directory, name), tests)[:-3]
            for directory, _, names in os.walk(tests)
            for name in names
            if name.startswith("test_") and name.endswith(".py")
        )
        missing = [m for m in modules
                   if not re.search(rf"(?<![\w/]){re.escape(m)}\b", text)]
        self.assertEqual(missing, [])


class CommandLineTests(SynchronousTestCase):
    """Documented command lines parse with the real option parsers."""

    def setUp(self) -> None:
        self.sandbox = Sandbox(self.mktemp())

    def parse(self, kind: str, args: list[str]) -> None:
        if kind == "twistd":
            parse_twistd(args, self.sandbox)
        else:
            parse_imgresume(args, self.sandbox)

    def test_shell_splitting(self) -> None:
        """
        Lines are split into simple commands at pipes and lists, without
        redirections, assignments or C{sudo}.
        """
        self.assertEqual(
            split_simple_commands(
                "A=1 sudo -u imgresume imgresume gc --storage /x --json | jq .a > out.json"),
            [["imgresume", "gc", "--storage", "/x", "--json"], ["jq", ".a"]],
        )
        self.assertEqual(
            split_simple_commands("imgresume keys add --keys k.json scanner-7 > scanner-7.key"),
            [["imgresume", "keys", "add", "--keys", "k.json", "scanner-7"]],
        )
        self.assertEqual(
            split_simple_commands("imgresume ls --storage /x >out 2>&1 && twistd --help"),
            [["imgresume", "ls", "--storage", "/x"], ["twistd", "--help"]],
        )
        self.assertEqual(command_kind(["twistd", "-ny", "tac/server.tac"]), None)
        self.assertEqual(command_kind([".venv/bin/python", "-m", "imgresume", "ls"]),
                         ("imgresume", ["ls"]))

    def test_drift_is_caught(self) -> None:
        """
        A removed option, a misspelt command and a server that would listen
        beyond loopback without authentication are refused.
        """
        for kind, line in [
            ("twistd", "-n imgresume --storage /srv/x --no-such-option"),
            ("twistd", "-n imgresume --listen tcp:9000 --storage /srv/x"),
            ("twistd", "-n imgresume-lb --listen tcp:7000"),
            ("imgresume", "uplaod --to tcp:h:1 FILE"),
            ("imgresume", "gc --storage /srv/x"),
        ]:
            with self.assertRaises((usage.UsageError, SystemExit), msg=line):
                self.parse(kind, shlex.split(line))

    def test_documented_commands_parse(self) -> None:
        """
        Every twistd imgresume, twistd imgresume-lb and imgresume command in
        the docs' shell blocks parses (placeholders and paths replaced by
        real things); the known exceptions in L{KNOWN_DRIFT} still fail.
        """
        commands = documented_commands()
        kinds = {(path, kind) for path, _, _, kind, _ in commands}
        for expected in [("README.md", "twistd"), ("README.md", "imgresume"),
                         ("docs/operations.md", "twistd"),
                         ("docs/operations.md", "imgresume")]:
            self.assertIn(expected, kinds)
        self.assertGreater(len(commands), 30)
        failures, still_drifting = [], set()
        for path, line_no, line, kind, args in commands:
            try:
                self.parse(kind, args)
            except (usage.UsageError, SystemExit, StopIteration) as e:
                if (path, line) in KNOWN_DRIFT:
                    still_drifting.add((path, line))
                    continue
                failures.append(f"{path}:{line_no}: {line}\n    -> {e}")
        self.assertEqual(failures, [], "\n".join(failures))
        self.assertEqual(still_drifting, set(KNOWN_DRIFT),
                         "a KNOWN_DRIFT entry parses now (or is gone): remove it")

    def test_unit_files_parse(self) -> None:
        """
        The ExecStart= lines of the example systemd units, with the example
        environment files of docs/operations.md, are command lines twistd
        accepts.
        """
        envs = env_examples()
        units = {
            "imgresume@.service": ("/etc/imgresume/node-a.env", "node-a"),
            "imgresume-lb.service": ("/etc/imgresume/lb.env", ""),
        }
        for unit, (env_path, instance) in units.items():
            directives = unit_directives(read(os.path.join(EXAMPLES, unit)))
            self.assertIn(env_path.replace(instance, "%i") if instance else env_path,
                          directives["EnvironmentFile"])
            self.assertIn(env_path, envs)
            [exec_start] = directives["ExecStart"]
            words = expand_exec_start(exec_start, envs[env_path], instance)
            self.assertEqual(os.path.basename(words[0]), "twistd")
            self.assertEqual(words[1:4], ["-n", "--pidfile=", "--logfile=-"])
            parse_twistd(words[1:], self.sandbox)

    def test_unit_hardening(self) -> None:
        """
        The server unit runs as the imgresume user with the promised
        hardening, and gives a stop more time than the server's drain.
        """
        directives = unit_directives(read(os.path.join(EXAMPLES, "imgresume@.service")))
        for key, value in [("User", "imgresume"), ("NoNewPrivileges", "yes"),
                           ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                           ("Restart", "on-failure"), ("KillSignal", "SIGTERM")]:
            self.assertEqual(directives.get(key), [value], key)
        self.assertTrue(directives.get("ReadWritePaths"))
        [timeout] = directives["TimeoutStopSec"]
        from imgresume.server._gc import GarbageCollectorService
        from imgresume.server._hooks import HookDispatcher

        drain = 10.0  # imgresume.server._service: _DrainService(grace=10.0)
        hooks = inspect.signature(HookDispatcher).parameters["stop_grace"].default
        self.assertGreater(float(timeout.rstrip("s")),
                           drain + hooks + GarbageCollectorService.stop_grace)


class LogEventTests(SynchronousTestCase):
    """docs/operations.md cites log events the code really emits."""

    def test_alert_events_exist(self) -> None:
        """Every event text in the alert table is a format string of the code."""
        events = alert_events()
        self.assertGreater(len(events), 10)
        formats = logged_formats()
        self.assertEqual([e for e in events if e not in formats], [])


class QuickStartTests(SynchronousTestCase):
    """The README's quick start runs."""

    PORTS = ("7000", "9001", "9002", "9003")
    STORAGE = "/tmp/imgresume-storage"

    def quick_start(self) -> list[str]:
        """The command lines of the README's "In five minutes" block."""
        text = read(README)
        section = text.split("## In five minutes", 1)[1]
        [(lang, _, body)] = fenced_blocks(section)[:1]
        self.assertEqual(lang, "sh")
        lines, current = [], ""
        for line in body:
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                current += line.rstrip()[:-1] + " "
                continue
            lines.append(" ".join((current + line).split()))
            current = ""
        return lines

    def test_quick_start(self) -> None:
        """
        The quick start, run as written with free ports and a temporary
        storage directory: three servers and a balancer start, the documented
        upload stores the file whole, and SIGTERM stops every process cleanly.
        """
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        storage = os.path.join(work, "imgresume-storage")
        ports = {p: str(free_tcp_port()) for p in self.PORTS}

        def adapt(line: str) -> str:
            line = line.replace(self.STORAGE, storage)
            pattern = r"(?<![\d.])(" + "|".join(self.PORTS) + r")(?!\d)"
            line = re.sub(pattern, lambda m: ports[m.group(1)], line)
            # A smaller test file than the README's.
            return re.sub(r"^head -c \S+ ", "head -c 24M ", line)

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
            XDG_STATE_HOME=os.path.join(work, "state"))
        programs = {
            "twistd": [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"],
            "imgresume": [sys.executable, "-m", "imgresume"],
        }
        jobs: list[tuple[subprocess.Popen, int, str]] = []

        def stop_all() -> None:
            for proc, _, _ in jobs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

        self.addCleanup(stop_all)

        def log_tails() -> str:
            out = []
            for name in sorted(os.listdir(work)):
                if name.endswith((".log", ".stderr")):
                    with open(os.path.join(work, name), errors="replace") as f:
                        out.append(f"--- {name}\n" + "".join(f.readlines()[-15:]))
            return "\n".join(out)

        lines = self.quick_start()
        self.assertEqual(lines[0], "make venv && . .venv/bin/activate")
        uploaded = stopped = False
        for line in lines[1:]:
            line = adapt(line)
            words = shlex.split(line)
            if words[0] in programs and line.endswith("&"):
                words = shlex.split(line[:-1])
                with open(os.path.join(work, f"job-{len(jobs) + 1}.stderr"), "wb") as err:
                    proc = subprocess.Popen(programs[words[0]] + words[1:], cwd=work,
                                            env=env, stdout=subprocess.DEVNULL, stderr=err)
                listen = words[words.index("--listen") + 1]
                port = int(re.match(r"tcp:(\d+):", listen).group(1))
                logfile = next(w.split("=", 1)[1] for w in words if w.startswith("--logfile="))
                jobs.append((proc, port, logfile))
                continue
            if words[0] == "imgresume":
                for proc, port, _ in jobs:
                    wait_until_connectable(("127.0.0.1", port), timeout=30, proc=proc)
                result = subprocess.run(programs["imgresume"] + words[1:], cwd=work, env=env,
                                        capture_output=True, text=True, timeout=60,
                                        check=False)
                self.assertEqual(result.returncode, 0,
                                 f"{line}\n{result.stderr}\n{log_tails()}")
                self.assertRegex(
                    result.stdout,
                    r"big-scan\.tiff: 25165824 bytes stored at complete/big-scan\.tiff, "
                    r"blake3 [0-9a-f]{64} verified")
                uploaded = True
                continue
            if words[0] == "kill":
                specs = [int(w[1:]) for w in words[1:]]
                self.assertEqual(specs, list(range(1, len(jobs) + 1)))
                for n in specs:
                    jobs[n - 1][0].send_signal(signal.SIGTERM)
                for proc, _, logfile in jobs:
                    try:
                        code = proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        self.fail(f"a process ignored SIGTERM\n{log_tails()}")
                    # twistd stops cleanly, then exits by the signal it got.
                    self.assertEqual(code, -signal.SIGTERM, log_tails())
                    with open(os.path.join(work, logfile)) as f:
                        self.assertIn("Server Shut Down.", f.read())
                stopped = True
                continue
            result = subprocess.run(line, shell=True, executable="/bin/bash", cwd=work,
                                    env=env, capture_output=True, text=True, timeout=60,
                                    check=False)
            self.assertEqual(result.returncode, 0, f"{line}\n{result.stderr}")
            if words[0] == "ls":
                self.assertIn("big-scan.tiff", result.stdout)
        self.assertEqual(len(jobs), 4)
        self.assertTrue(uploaded and stopped)
        with open(os.path.join(work, "big-scan.tiff"), "rb") as f:
            source = hashlib.sha256(f.read()).hexdigest()
        with open(os.path.join(storage, "complete", "big-scan.tiff"), "rb") as f:
            stored = hashlib.sha256(f.read()).hexdigest()
        self.assertEqual(stored, source)
