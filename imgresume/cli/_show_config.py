# -*- test-case-name: tests.cli.test_config -*-
"""C{imgresume config}: the upload settings in effect and where each comes from."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping

from imgresume._options import EXIT_FAILED, EXIT_OK, BaseOptions
from imgresume.cli._config import SETTINGS, ConfigError, config_path, resolve
from imgresume.cli._upload import UploadOptions


class ConfigOptions(BaseOptions):
    synopsis = "[--json]"
    longdesc = f"""Print the upload settings in effect and where each comes from: a flag,
an IMGRESUME_* environment variable, the config file or the default.

The config file is $XDG_CONFIG_HOME/imgresume/config.toml
(~/.config/imgresume/config.toml without XDG_CONFIG_HOME); the settings go
in its [upload] table, named as the flags are:

  [upload]
  to = "tcp:lb.example:7000"
  key-file = "~/.config/imgresume/scanner-7.key"
  client-id = "scanner-7"
  parallel = 8

Settings: {", ".join(SETTINGS)}.
Each has an environment variable: IMGRESUME_TO, IMGRESUME_KEY_FILE, ...
A flag wins over the environment, the environment over the file."""
    optFlags = [["json", None, "Print JSON: each setting's value and source."]]


def run_config(config: ConfigOptions, out: Any = None,
               environ: Mapping[str, str] | None = None) -> int:
    """C{imgresume config}: print the settings in effect; the exit code."""
    out = out or sys.stdout
    environ = os.environ if environ is None else environ
    try:
        settings = resolve({}, UploadOptions().defaults, environ)
    except ConfigError as e:
        print(f"imgresume: config: {e}", file=sys.stderr)
        return EXIT_FAILED
    path = config_path(environ)
    if config["json"]:
        print(json.dumps({"file": path, "file_exists": os.path.exists(path),
                          "settings": {k: {"value": s.value, "source": s.source}
                                       for k, s in settings.items()}},
                         sort_keys=True), file=out)
        return EXIT_OK
    print(f"# config file: {path}{'' if os.path.exists(path) else ' (none)'}", file=out)
    for key, setting in settings.items():
        shown = "(none)" if setting.value is None else setting.value
        print(f"{key:<16} {shown:<40} {setting.source}", file=out)
    return EXIT_OK
