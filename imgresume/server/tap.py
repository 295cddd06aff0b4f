"""
C{twistd imgresume}: run one upload server.  Imported only when the
subcommand runs (the drop-in in C{twisted/plugins/} names this module).
"""

from __future__ import annotations

import os

from twisted.python import usage

from imgresume.protocol import ServerLimits
from imgresume._options import BaseOptions
from imgresume.sizes import parse_duration, parse_size


class Options(BaseOptions):
    synopsis = "--listen ENDPOINT --storage DIR [options]"
    longdesc = """Run an imgresume upload server.

Several servers, on one host or many, may share one storage directory (a
shared filesystem such as NFS, CephFS or GlusterFS): any of them can resume
an upload another one started.  Put them behind `twistd imgresume-lb` or
HAProxy.

Example:
  twistd -n --pidfile= imgresume --listen tcp:9001:interface=127.0.0.1 \\
      --storage /srv/imgresume --server-id node-a
"""
    optParameters = [
        ["listen", "l", "tcp:9000:interface=127.0.0.1",
         "Twisted server endpoint to listen on (tcp:PORT, ssl:..., unix:PATH, haproxy:...)."],
        ["storage", "s", None, "Storage directory, shared by every server of the pool (required)."],
        ["server-id", None, None, "Name of this server in logs and in the handshake "
         "[default: HOST:PID]."],
        ["max-file-size", None, "1T", "Largest file a client may declare (e.g. 500M, 20G)."],
        ["chunk-size", None, "1M", "Payload size the server recommends to clients."],
        ["max-payload", None, "4M", "Largest DATA payload accepted."],
        ["handshake-timeout", None, "30s", "Time a client has to complete the handshake."],
        ["idle-timeout", None, "5m", "Silence after which a connection is closed "
         "(and its upload released for another server)."],
        ["takeover-idle", None, "10s", "A connection silent this long gives its upload up "
         "to a newer connection that asks for it (a client that reconnected elsewhere)."],
        ["threads", None, "8", "Threads for disk work."],
    ]

    def postOptions(self) -> None:
        if not self["storage"]:
            raise usage.UsageError("--storage DIR is required")
        if not os.path.isdir(self["storage"]):
            raise usage.UsageError(f"--storage {self['storage']}: not a directory")
        try:
            self["limits"] = ServerLimits(
                max_payload=parse_size(self["max-payload"]),
                chunk_size=parse_size(self["chunk-size"]),
                max_file_size=parse_size(self["max-file-size"]),
            )
            for key in ("handshake-timeout", "idle-timeout", "takeover-idle"):
                self[key] = parse_duration(self[key])
            self["threads"] = int(self["threads"])
        except ValueError as e:
            raise usage.UsageError(str(e))
        if self["limits"].chunk_size > self["limits"].max_payload:
            raise usage.UsageError("--chunk-size must not exceed --max-payload")


def makeService(config: Options):
    from imgresume.server import makeServerService

    return makeServerService(
        config["listen"],
        config["storage"],
        server_id=config["server-id"],
        limits=config["limits"],
        handshake_timeout=config["handshake-timeout"],
        idle_timeout=config["idle-timeout"],
        takeover_idle=config["takeover-idle"],
        threads=config["threads"],
    )
