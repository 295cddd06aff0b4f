# -*- test-case-name: tests.cli.test_config -*-
"""
Tests for L{imgresume.cli._config} and L{imgresume.cli._show_config}: the upload settings from flags,
C{IMGRESUME_*} variables and C{config.toml}, their precedence, the errors
for a bad file, and C{imgresume config}.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from imgresume.cli._config import ConfigError, config_path, env_name, read_file, resolve
from imgresume.cli._show_config import ConfigOptions, run_config
from imgresume.cli._upload import UploadOptions
from tests.support.processes import REPO_ROOT, child_env


class ConfigTestCase(SynchronousTestCase):
    """A config directory of its own, and an environment with nothing set."""

    def setUp(self) -> None:
        self.home = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.home, "imgresume"))
        self.environ = {"XDG_CONFIG_HOME": self.home, "HOME": self.home}
        self.patch(os, "environ", self.environ)

    def write(self, text: str) -> str:
        """Write the config file; its path."""
        path = os.path.join(self.home, "imgresume", "config.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def upload(self, *argv: str) -> UploadOptions:
        """Parse C{imgresume upload ARGV} in this environment."""
        options = UploadOptions()
        options.parseOptions(list(argv))
        return options


class PathTests(ConfigTestCase):
    """Where the config file is looked for."""

    def test_xdg_config_home(self) -> None:
        """$XDG_CONFIG_HOME/imgresume/config.toml."""
        self.assertEqual(config_path({"XDG_CONFIG_HOME": "/etc/x"}),
                         os.path.join("/etc/x", "imgresume", "config.toml"))

    def test_home(self) -> None:
        """Without XDG_CONFIG_HOME: ~/.config/imgresume/config.toml."""
        del self.environ["XDG_CONFIG_HOME"]
        self.assertEqual(config_path(self.environ),
                         os.path.join(self.home, ".config", "imgresume", "config.toml"))

    def test_env_names(self) -> None:
        """Each setting's variable is IMGRESUME_ and its name in capitals, - as _."""
        self.assertEqual(env_name("key-file"), "IMGRESUME_KEY_FILE")
        self.assertEqual(env_name("to"), "IMGRESUME_TO")


class PrecedenceTests(ConfigTestCase):
    """Flags over the environment over the file over the default."""

    def test_default(self) -> None:
        """Nothing set: the built-in defaults; --to is still required."""
        with self.assertRaises(UsageError) as e:
            self.upload("a.tif")
        self.assertIn("--to ENDPOINT is required", str(e.exception))
        self.assertIn("IMGRESUME_TO", str(e.exception))

    def test_file(self) -> None:
        """The file's [upload] table sets what neither flags nor variables do."""
        path = self.write('[upload]\nto = "tcp:lb.example:7000"\nparallel = 8\n'
                          'key_file = "~/scanner.key"\nmax-put = "1M"\n')
        options = self.upload("a.tif")
        self.assertEqual(options["to"], "tcp:lb.example:7000")
        self.assertEqual(options["parallel"], 8)
        self.assertEqual(options["max-put"], 1024 * 1024)
        self.assertEqual(options["key-file"], os.path.join(self.home, "scanner.key"))
        self.assertEqual(options.sources["parallel"].source, f"{path}:3")
        self.assertEqual(options.sources["window"].source if "window" in options.sources
                         else "default", "default")

    def test_env_over_file(self) -> None:
        """An IMGRESUME_* variable wins over the file."""
        self.write('[upload]\nto = "tcp:lb.example:7000"\nparallel = 8\n')
        self.environ["IMGRESUME_PARALLEL"] = "3"
        options = self.upload("a.tif")
        self.assertEqual(options["parallel"], 3)
        self.assertEqual(options.sources["parallel"].source, "IMGRESUME_PARALLEL")
        self.assertEqual(options["to"], "tcp:lb.example:7000")

    def test_flag_over_env(self) -> None:
        """A flag wins over the environment and the file, even one equal to the default."""
        self.write('[upload]\nparallel = 8\nif-exists = "fail"\n')
        self.environ["IMGRESUME_PARALLEL"] = "3"
        self.environ["IMGRESUME_TO"] = "tcp:env.example:7000"
        options = self.upload("--parallel", "4", "--to", "tcp:flag.example:7000",
                              "--if-exists", "rename", "a.tif")
        self.assertEqual((options["parallel"], options["to"], options["if-exists"]),
                         (4, "tcp:flag.example:7000", "rename"))
        self.assertEqual(options.sources["parallel"].source, "--parallel")

    def test_key_file_env(self) -> None:
        """$IMGRESUME_KEY_FILE, as before, gives the key file."""
        self.environ["IMGRESUME_KEY_FILE"] = "/k.key"
        options = self.upload("--to", "tcp:h:1", "a.tif")
        self.assertEqual(options["key-file"], "/k.key")

    def test_no_file_no_toml(self) -> None:
        """Without a file, tomllib is not even imported."""
        saved = sys.modules.pop("tomllib", None)
        self.addCleanup(lambda: saved and sys.modules.__setitem__("tomllib", saved))
        self.upload("--to", "tcp:h:1", "a.tif")
        self.assertNotIn("tomllib", sys.modules)

    def test_bad_value_says_where(self) -> None:
        """A bad value from the file or the environment names where it came from."""
        path = self.write('[upload]\nto = "tcp:h:1"\nparallel = 99\n')
        with self.assertRaises(UsageError) as e:
            self.upload("a.tif")
        self.assertIn(f"parallel from {path}:3", str(e.exception))
        self.environ["IMGRESUME_IF_EXISTS"] = "maybe"
        self.environ["IMGRESUME_PARALLEL"] = "2"
        with self.assertRaises(UsageError) as e:
            self.upload("a.tif")
        self.assertIn("if-exists from IMGRESUME_IF_EXISTS", str(e.exception))


class FileErrorTests(ConfigTestCase):
    """A bad file: which file, which line, which setting."""

    def test_syntax(self) -> None:
        """Not TOML: the file and tomllib's line and column."""
        path = self.write('[upload]\nto = \n')
        with self.assertRaises(ConfigError) as e:
            read_file(path)
        self.assertIn(path, str(e.exception))
        self.assertIn("line 2", str(e.exception))

    def test_unknown_setting(self) -> None:
        """A misspelt setting is refused, with its line and the known ones."""
        path = self.write('[upload]\nto = "h:1"\n\nparalel = 8\n')
        with self.assertRaises(ConfigError) as e:
            read_file(path)
        self.assertIn(f"{path}:4: [upload] has no setting 'paralel'", str(e.exception))
        self.assertIn("parallel", str(e.exception))

    def test_unknown_table(self) -> None:
        """Settings outside [upload] are refused."""
        path = self.write('to = "h:1"\n')
        with self.assertRaises(ConfigError) as e:
            read_file(path)
        self.assertIn(f"{path}:1: unknown setting 'to'", str(e.exception))

    def test_wrong_type(self) -> None:
        """A list or a boolean is not a value."""
        path = self.write('[upload]\nparallel = true\n')
        with self.assertRaises(ConfigError) as e:
            read_file(path)
        self.assertIn(f"{path}:2: parallel must be a string or a number", str(e.exception))

    def test_usage_error(self) -> None:
        """The upload command reports the file's error as a usage error."""
        path = self.write('[upload\n')
        with self.assertRaises(UsageError) as e:
            self.upload("--to", "h:1", "a.tif")
        self.assertIn(path, str(e.exception))

    def test_file_not_read_when_all_set(self) -> None:
        """The file is not read for settings the flags and variables all give."""
        self.write('[upload\n')
        given = {k: "1" for k in ("to", "key-file", "client-id", "parallel", "max-put",
                                  "if-exists", "journal", "max-attempts")}
        environ = {**self.environ, "IMGRESUME_STALL_TIMEOUT": "1s",
                   "IMGRESUME_CONNECT_TIMEOUT": "1s", "IMGRESUME_BACKOFF_MAX": "1s"}
        self.assertEqual(resolve(given, {}, environ)["to"].source, "--to")


class ShowConfigTests(ConfigTestCase):
    """C{imgresume config}."""

    def test_table(self) -> None:
        """Each setting, its value and its source."""
        path = self.write('[upload]\nto = "tcp:lb.example:7000"\n')
        self.environ["IMGRESUME_PARALLEL"] = "6"
        out = io.StringIO()
        config = ConfigOptions()
        config.parseOptions([])
        self.assertEqual(run_config(config, out), 0)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0], f"# config file: {path}")
        self.assertEqual(lines[1].split(), ["to", "tcp:lb.example:7000", f"{path}:2"])
        self.assertIn(["parallel", "6", "IMGRESUME_PARALLEL"], [l.split() for l in lines])
        self.assertIn(["if-exists", "rename", "default"], [l.split() for l in lines])

    def test_json(self) -> None:
        """--json: the same as one JSON object."""
        out = io.StringIO()
        config = ConfigOptions()
        config.parseOptions(["--json"])
        self.assertEqual(run_config(config, out), 0)
        shown = json.loads(out.getvalue())
        self.assertFalse(shown["file_exists"])
        self.assertEqual(shown["settings"]["parallel"], {"value": "4", "source": "default"})

    def test_bad_file(self) -> None:
        """A bad file: exit 1, the error on stderr."""
        self.write('[upload]\nnope = 1\n')
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(run_config(ConfigOptions(), io.StringIO()), 1)
        self.assertIn("has no setting 'nope'", err.getvalue())

    def test_command(self) -> None:
        """C{python -m imgresume config} in a child process."""
        path = self.write('[upload]\nclient-id = "scanner-7"\n')
        env = child_env(XDG_CONFIG_HOME=self.home, IMGRESUME_TO="tcp:h:7000")
        done = subprocess.run([sys.executable, "-m", "imgresume", "config"], env=env,
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("scanner-7", done.stdout)
        self.assertIn(f"{path}:2", done.stdout)
        self.assertIn("IMGRESUME_TO", done.stdout)
