"""
tus over imgresume (issue 14, "Performance"): the same tus-js-client as the
tus-node-server baseline (L{bench.tus}), one PATCH, the same file, to
C{twistd imgresume --http}:

 - C{tus-imgresume-direct}: to one server's HTTP port;
 - C{tus-imgresume-lb}: through C{twistd imgresume-lb --check-mode connect}
   to three servers over one storage directory (round robin: the creation
   and the PATCH may land on different servers).

Every server runs as users run it: it fsyncs before each acknowledged
offset, reads the stored file back to check its SHA-256 before publishing
it (the SHA-256 of what it received, tus-js-client sending no digest),
as in C{docs/http.md}.  Each measurement checks the published file's
SHA-256 against the source's (a failed or short upload is no
measurement), then empties the storage.

CPU: the client as in L{bench.tus}; servers and balancer from
/proc/<pid>/stat before and after (direct: the one server; through the
balancer: the three servers, and the balancer apart).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from bench._common import Workdir, child_env, settle
from bench.tus import TusNode, sha256_file

#: Measurement names (rows of the single group).
DIRECT = "tus-imgresume-direct"
LB = "tus-imgresume-lb"
SERVERS = 3


class TusImgresume:
    """
    Three C{twistd imgresume --http} servers on 127.0.0.1 over one storage
    directory and an C{imgresume-lb} in front of their HTTP ports, driven
    by the tus-js-client of a prepared L{TusNode}.  L{start}, L{upload}
    (one measured, verified run), L{stop}; the single group runs it beside
    tus-node-server.
    """

    def __init__(self, work: Workdir, client: TusNode) -> None:
        from imgresume.testing import free_tcp_port, twistd_argv

        self.work = work
        self.client = client
        self.storage = work.fresh("storage-tus")
        self.ports: dict[str, int] = {}
        self.argv: dict[str, list[str]] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        for i in range(1, SERVERS + 1):
            node = f"node-{i}"
            self.ports[node] = free_tcp_port()
            self.argv[node] = twistd_argv(
                "--logfile", work.sub("logs", f"tus-imgresume-{node}.log"), "imgresume",
                "--listen", f"tcp:{free_tcp_port()}:interface=127.0.0.1",
                "--http", f"tcp:{self.ports[node]}:interface=127.0.0.1",
                "--storage", self.storage, "--server-id", node,
                "--max-connections-per-address", "0", "--gc-interval", "0")
        self.ports["lb"] = free_tcp_port()
        self.argv["lb"] = twistd_argv(
            "--logfile", work.sub("logs", "tus-imgresume-lb.log"), "imgresume-lb",
            "--listen", f"tcp:{self.ports['lb']}:interface=127.0.0.1",
            "--check-mode", "connect", "--max-connections-per-address", "0",
            *[a for node in self.servers for a in
              ("--backend", f"tcp:127.0.0.1:{self.ports[node]}")])

    @property
    def servers(self) -> list[str]:
        return [n for n in self.argv if n != "lb"]

    def start(self) -> TusImgresume:
        """The servers, then the balancer; returns once each accepts connections."""
        from imgresume.testing import wait_until_connectable

        with open(self.work.sub("logs", "tus-imgresume.stderr"), "ab") as err:
            for node, argv in self.argv.items():
                self.procs[node] = subprocess.Popen(
                    argv, env=child_env(), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=err)
                try:
                    wait_until_connectable(("127.0.0.1", self.ports[node]), timeout=60,
                                           proc=self.procs[node])
                except Exception as e:
                    self.stop()
                    raise RuntimeError(f"tus over imgresume: {node} did not start: {e}") from e
        return self

    def stop(self) -> None:
        procs, self.procs = self.procs, {}
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def clear(self) -> None:
        """Empty the storage between measurements (the servers keep running)."""
        settle(os.path.join(self.storage, "complete"), os.path.join(self.storage, "incoming"))

    def upload(self, src: str, via: str, timeout: float | None = None) -> dict[str, Any]:
        """
        One upload of C{src} by tus-js-client in one PATCH, C{via} "direct"
        (node-1) or "lb" (the balancer, three servers); timed inside the
        client from creating the upload to the PATCH's answer; the
        published file's SHA-256 checked against the source's.
        """
        self.clear()
        size = os.path.getsize(src)
        timeout = timeout or 120.0 + size / 4e6
        name = DIRECT if via == "direct" else LB
        node = "node-1" if via == "direct" else "lb"
        roles = ({"server": self.procs["node-1"].pid} if via == "direct" else
                 {**{n: self.procs[n].pid for n in self.servers}, "lb": self.procs["lb"].pid})
        res = self.client.client([src], None, 1, timeout, name,
                                 endpoint=f"http://127.0.0.1:{self.ports[node]}/files/",
                                 servers=roles)
        [f] = res["files"]
        if f.get("error") or not f.get("url"):
            raise RuntimeError(f"tus ({name}): {f.get('error', 'no URL')}")
        stored = os.path.join(self.storage, "complete", os.path.basename(src))
        if not os.path.isfile(stored):
            raise RuntimeError(f"tus ({name}): {os.path.basename(src)} not stored")
        if sha256_file(stored) != self.client.digest(src):
            raise RuntimeError(f"tus ({name}): stored bytes differ")
        cpus = res["cpus"]
        cpu = {"client": res["cpu"],
               "server": sum(v for k, v in cpus.items() if k != "lb")}
        if "lb" in cpus:
            cpu["lb"] = cpus["lb"]
        self.clear()
        return {
            "name": name,
            "bytes": size,
            "seconds": f["end"] - f["start"],
            "cpu": cpu,
            "client_process_cpu": res["process_cpu"],
            "patches": f["patches"],
            "chunk_size": None,
            "servers": 1 if via == "direct" else SERVERS,
            "verified": True,
        }


def start(work: Workdir, client: TusNode, notes: list[str]) -> TusImgresume | None:
    """
    The tus-over-imgresume servers started, for a L{TusNode} whose client
    is ready; None (and a note) if they could not start.
    """
    try:
        return TusImgresume(work, client).start()
    except RuntimeError as e:
        notes.append(f"tus over imgresume left out of this run: {e}")
        return None
