# -*- test-case-name: tests.cli.test_shell -*-
"""
Tests for L{imgresume.cli._completion} and L{imgresume.cli._manpage}:
C{imgresume completion bash|zsh} and C{imgresume man} produce scripts and
a page that name every command and every option; the bash script completes
in a real bash; zsh's answers come from Twisted's C{--_shell-completion};
the page renders in groff without warnings.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys

from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from imgresume.cli import Options
from imgresume.cli._completion import (
    CompletionOptions,
    bash_script,
    command_tree,
    options_of,
    run_completion,
    zsh_script,
)
from imgresume.cli._manpage import man_page
from tests.support.processes import REPO_ROOT, child_env

#: Every command, as the words that name it: a check that the tree is whole.
EXPECTED_COMMANDS = {
    ("upload",), ("status",), ("ls",), ("keys",), ("keys", "add"), ("keys", "revoke"),
    ("keys", "list"), ("gc",), ("check-storage",), ("config",), ("completion",), ("man",),
}


class TreeTests(SynchronousTestCase):
    """L{command_tree} walks every command."""

    def test_commands(self) -> None:
        """Every command and subcommand, each once."""
        words = [c.words for c in command_tree()]
        self.assertEqual(words[0], ())
        self.assertEqual(set(words[1:]), EXPECTED_COMMANDS)
        self.assertEqual(len(words), len(set(words)))

    def test_options(self) -> None:
        """The upload command's options, with their short forms and whether they take a value."""
        [upload] = [c for c in command_tree() if c.words == ("upload",)]
        found = {o.name: o for o in options_of(upload.options)}
        self.assertEqual((found["parallel"].short, found["parallel"].takes_value), ("P", True))
        self.assertEqual((found["json"].short, found["json"].takes_value), (None, False))
        self.assertEqual(found["dry-run"].short, "n")


def _bash_complete(script: str, *words: str) -> list[str]:
    """What the bash script completes for C{imgresume WORDS} (the last one being typed)."""
    if shutil.which("bash") is None:
        raise SkipTest("no bash")
    line = ["imgresume", *words]
    program = (script + "\nCOMP_WORDS=(" + " ".join(f"'{w}'" for w in line) + ")\n"
               f"COMP_CWORD={len(line) - 1}\n_imgresume\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


class BashTests(SynchronousTestCase):
    """C{imgresume completion bash}."""

    def setUp(self) -> None:
        self.script = bash_script()

    def test_names_everything(self) -> None:
        """Every command word and every long option of every command is in the script."""
        for command in command_tree():
            for word in command.words:
                self.assertIn(word, self.script)
            for option in options_of(command.options):
                self.assertIn(f"--{option.name}", self.script)

    def test_syntax(self) -> None:
        """bash -n accepts it."""
        if shutil.which("bash") is None:
            raise SkipTest("no bash")
        done = subprocess.run(["bash", "-n"], input=self.script, capture_output=True,
                              text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)

    def test_completes(self) -> None:
        """Commands, subcommands, options and an option's values, in a real bash."""
        self.assertEqual(_bash_complete(self.script, "up"), ["upload"])
        self.assertEqual(_bash_complete(self.script, "keys", "r"), ["revoke"])
        self.assertEqual(_bash_complete(self.script, "upload", "--par"), ["--parallel"])
        self.assertEqual(_bash_complete(self.script, "keys", "add", "--ro"), ["--rotate"])
        self.assertEqual(_bash_complete(self.script, "upload", "--if-exists", "s"), ["skip"])
        self.assertEqual(_bash_complete(self.script, "upload", "--to", ""), [])
        self.assertIn("--json", _bash_complete(self.script, "config", "--"))

    def test_command(self) -> None:
        """C{python -m imgresume completion bash} prints it."""
        done = subprocess.run([sys.executable, "-m", "imgresume", "completion", "bash"],
                              env=child_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, self.script)

    def test_shell_required(self) -> None:
        """Another shell is a usage error."""
        self.assertRaises(UsageError, CompletionOptions().parseOptions, ["fish"])
        self.assertRaises(UsageError, CompletionOptions().parseOptions, [])


class ZshTests(SynchronousTestCase):
    """C{imgresume completion zsh}: Twisted's stub, and Twisted's answers."""

    def test_stub(self) -> None:
        """The script is Twisted's stub, for imgresume, calling --_shell-completion."""
        script = zsh_script()
        self.assertTrue(script.startswith("#compdef imgresume\n"))
        self.assertIn("--_shell-completion zsh:$CURRENT", script)
        out = io.StringIO()
        config = CompletionOptions()
        config.parseOptions(["zsh"])
        self.assertEqual(run_completion(config, out), 0)
        self.assertEqual(out.getvalue(), script)

    def answer(self, *words: str) -> str:
        """What C{imgresume WORDS --_shell-completion zsh:N} prints (N: the last word)."""
        self.patch(sys, "argv", ["/usr/bin/imgresume"])  # Twisted names the command so
        options = Options()
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        options._shellCompFile = out  # Twisted writes to its .buffer
        line = ["imgresume", *words]
        with self.assertRaises(SystemExit):
            options.parseOptions([*words, "--_shell-completion", f"zsh:{len(line)}"])
        return out.buffer.getvalue().decode("utf-8")

    def test_every_command_and_option(self) -> None:
        """
        For C{imgresume} and each of its commands, zsh is offered the
        subcommands and every option.  Twisted's generator goes one level
        down only: C{keys add|revoke|list} are not completed (docs/client.md
        says so).
        """
        for command in command_tree():
            if len(command.words) > 1 or command.words == ("keys",):
                continue
            answer = self.answer(*command.words, "")
            self.assertTrue(answer.startswith("#compdef imgresume"), command.words)
            for option in options_of(command.options):
                self.assertIn(f"--{option.name}", answer, command.words)
            for name, *_ in getattr(command.options, "subCommands", None) or ():
                self.assertIn(f'"{name}:', answer, command.words)

    def test_values(self) -> None:
        """--if-exists offers its three values."""
        self.assertIn(":if-exists:(rename skip fail)", self.answer("upload", "--if-exists"))


class ManTests(SynchronousTestCase):
    """C{imgresume man}."""

    def setUp(self) -> None:
        self.page = man_page()

    def test_names_everything(self) -> None:
        """Every command's usage line and every option are on the page."""
        self.assertTrue(self.page.startswith(".TH IMGRESUME 1 "))
        for command in command_tree():
            if command.words:
                self.assertIn(f'.SS "imgresume {" ".join(command.words)}'
                              .replace("-", "\\-"), self.page)
            for option in options_of(command.options):
                self.assertIn("\\-\\-" + option.name.replace("-", "\\-"), self.page)
        self.assertIn("IMGRESUME_TO", self.page)
        self.assertIn("config.toml", self.page)

    def test_renders(self) -> None:
        """groff renders it without a warning; the text has the commands."""
        if shutil.which("groff") is None:
            raise SkipTest("no groff")
        done = subprocess.run(["groff", "-man", "-Tutf8", "-ww"], input=self.page,
                              capture_output=True, text=True, timeout=60)
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        text = re.sub(".\x08", "", done.stdout)  # no overstrike (bold, underline)
        for needed in ("imgresume upload --to ENDPOINT", "imgresume keys add",
                       "--if-exists=IF-EXISTS", "[default: 4]", "check-storage"):
            self.assertIn(needed, text.replace("\u2010", "-").replace("\u2212", "-"))

    def test_command(self) -> None:
        """C{python -m imgresume man} prints it."""
        done = subprocess.run([sys.executable, "-m", "imgresume", "man"], env=child_env(),
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout, self.page)
