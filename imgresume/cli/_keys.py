# -*- test-case-name: tests.test_auth,tests.cli.test_errors -*-
"""C{imgresume keys}: manage the per-client keys servers authenticate with."""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any

from twisted.python import usage

from imgresume._options import EXIT_FAILED, EXIT_OK, BaseOptions
from imgresume.keys import KeyFileError, add_client, list_clients, revoke_client


class _KeyFileOptions(BaseOptions):
    optParameters = [
        ["keys", "k", None, "The key file the servers read (their --keys) (required)."],
    ]

    def postOptions(self) -> None:
        if not self["keys"]:
            raise usage.UsageError("--keys FILE is required")


class _OneClient(_KeyFileOptions):
    def parseArgs(self, client_id: str) -> None:
        self["client-id"] = client_id


class AddOptions(_OneClient):
    synopsis = "--keys FILE CLIENT_ID [--rotate]"
    longdesc = """Create a key for CLIENT_ID and print it once, on stdout.

Give the key to the client (e.g. in a file read with `imgresume upload
--key-file`); the server keeps only its copy in the key file.  Servers pick
up the change within seconds, without a restart.

Example:
  imgresume keys add --keys /etc/imgresume/keys.json scanner-7 > scanner-7.key
"""
    optFlags = [["rotate", None, "Replace the client's existing key."]]


class RevokeOptions(_OneClient):
    synopsis = "--keys FILE CLIENT_ID"
    longdesc = """Revoke CLIENT_ID's key: servers refuse it within seconds.

Its uploads stay on the storage; a new key (`keys add --rotate`) lets the
client resume them."""


class ListOptions(_KeyFileOptions):
    synopsis = "--keys FILE [--json]"
    longdesc = "List the clients in the key file (never the keys)."
    optFlags = [["json", None, "Print JSON."]]


class KeysOptions(BaseOptions):
    synopsis = "COMMAND --keys FILE ..."
    longdesc = """Manage client keys.  Servers started with `--keys FILE` require every
client to prove, in the handshake, that it knows its key (HMAC
challenge-response: the key never travels on the wire)."""
    subCommands = [
        ["add", None, AddOptions, "Create (or rotate) a client's key."],
        ["revoke", None, RevokeOptions, "Revoke a client's key."],
        ["list", None, ListOptions, "List clients."],
    ]

    def getSynopsis(self) -> str:
        """
        This command's usage line; for a subcommand's (which Twisted builds
        as the parent's line, the subcommand and its own synopsis) only
        C{imgresume keys}, so that it reads C{imgresume keys add --keys FILE
        CLIENT_ID [--rotate]}.
        """
        if self.subCommand is None or self.parent is None:
            return super().getSynopsis()
        return f"{self.parent.getSynopsis()} {self.parent.subCommand}"

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("name a command: add, revoke or list")


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_keys(config: KeysOptions, out: Any = None) -> int:
    """Run C{imgresume keys ...}; returns the exit code."""
    out = out or sys.stdout
    sub = config.subOptions
    try:
        if config.subCommand == "add":
            key = add_client(sub["keys"], sub["client-id"], rotate=sub["rotate"])
            print(key.hex(), file=out, flush=True)
            print(f"imgresume: key for {sub['client-id']} written to {sub['keys']}; "
                  "the line above is the client's copy (not shown again)", file=sys.stderr)
        elif config.subCommand == "revoke":
            revoke_client(sub["keys"], sub["client-id"])
            print(f"revoked {sub['client-id']}", file=out, flush=True)
        else:
            clients = list_clients(sub["keys"])
            if sub["json"]:
                print(json.dumps(clients, sort_keys=True), file=out, flush=True)
            else:
                for c in clients:
                    state = f"revoked {_when(c['revoked'])}" if c["revoked"] else "active"
                    print(f"{c['client_id']:<32} created {_when(c['created'])}  {state}",
                          file=out)
    except KeyFileError as e:
        print(f"imgresume: keys: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
