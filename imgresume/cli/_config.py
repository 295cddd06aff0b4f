# -*- test-case-name: tests.cli.test_config -*-
"""
The upload settings a scanning station keeps instead of long command
lines: flags, then C{IMGRESUME_*} environment variables, then the file
C{$XDG_CONFIG_HOME/imgresume/config.toml} (C{~/.config/...} without
C{XDG_CONFIG_HOME}), then the built-in default; the first that sets a
value wins.  C{imgresume config} prints what is in effect and where each
value comes from (L{imgresume.cli._show_config}).

Reading costs one C{stat} when there is no file: C{tomllib} is imported
only when the file exists (the command's start-up is measured by
C{tests.cli.test_startup}).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, NamedTuple

#: The upload options a config file or the environment may set.
SETTINGS = (
    "to", "key-file", "client-id", "parallel", "max-put", "if-exists", "journal",
    "max-attempts", "stall-timeout", "connect-timeout", "backoff-max",
)
#: The settings that name a file: C{~} in them is the home directory.
PATHS = frozenset({"key-file", "journal"})
#: The table of the config file the upload settings are in.
TABLE = "upload"


class ConfigError(Exception):
    """The config file or an C{IMGRESUME_*} variable is unusable; the message says where."""


class Setting(NamedTuple):
    """One setting in effect: its value (as a flag would give it) and where it came from."""

    value: Any
    source: str  # "--parallel", "IMGRESUME_PARALLEL", "/path/config.toml:3" or "default"


def env_name(key: str) -> str:
    """The environment variable for setting C{key}: C{IMGRESUME_KEY_FILE} for C{key-file}."""
    return "IMGRESUME_" + key.upper().replace("-", "_")


def config_path(environ: Mapping[str, str] | None = None) -> str:
    """Where the config file is looked for."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "imgresume", "config.toml")


def read_file(path: str) -> dict[str, Setting]:
    """
    The settings in the config file at C{path} (none if it does not exist).

    @raise ConfigError: the file is not valid TOML, or sets an unknown
        setting or a value of the wrong type; the message names the file,
        and the line and the setting where it can.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}")
    import tomllib

    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}")
    unknown_tables = sorted(k for k in data if k != TABLE)
    if unknown_tables:
        name = unknown_tables[0]
        raise ConfigError(f"{path}:{_line(text, name)}: unknown {'table' if isinstance(data[name], dict) else 'setting'} "
                          f"{name!r} (the upload settings go in an [{TABLE}] table)")
    table = data.get(TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}:{_line(text, TABLE)}: {TABLE} must be a table ([{TABLE}])")
    found = {}
    for name, value in table.items():
        key = name.replace("_", "-")
        where = f"{path}:{_line(text, name)}"
        if key not in SETTINGS:
            raise ConfigError(f"{where}: [{TABLE}] has no setting {name!r} "
                              f"(known: {', '.join(SETTINGS)})")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: {name} must be a string or a number, "
                              f"not {type(value).__name__}")
        value = str(value)
        found[key] = Setting(os.path.expanduser(value) if key in PATHS else value, where)
    return found


def _line(text: str, name: str) -> int | str:
    """The line that sets (or opens the table) C{name}, or "?" if it cannot be told."""
    pattern = re.compile(rf"^\s*(\[\s*{re.escape(name)}\s*\]|[\"']?{re.escape(name)}[\"']?\s*=)")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return "?"


def resolve(given: Mapping[str, Any], defaults: Mapping[str, Any],
            environ: Mapping[str, str] | None = None) -> dict[str, Setting]:
    """
    Every setting in effect: C{given} (the flags used) over the
    environment over the config file over C{defaults}.  The file is read
    only for what neither the flags nor the environment set.
    """
    environ = os.environ if environ is None else environ
    found: dict[str, Setting] = {}
    for key in SETTINGS:
        if key in given:
            found[key] = Setting(given[key], f"--{key}")
        elif environ.get(env_name(key)):
            value = environ[env_name(key)]
            found[key] = Setting(os.path.expanduser(value) if key in PATHS else value,
                                 env_name(key))
    missing = [key for key in SETTINGS if key not in found]
    if missing:
        in_file = read_file(config_path(environ))
        for key in missing:
            found[key] = in_file.get(key) or Setting(defaults.get(key), "default")
    return {key: found[key] for key in SETTINGS}
