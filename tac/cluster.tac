# A whole cluster in one process, for trying imgresume out:
#   twistd -ny tac/cluster.tac
# then:  imgresume upload --to tcp:127.0.0.1:7000 FILE
#
# A balancer on 127.0.0.1:7000 in front of three servers on 9001-9003, all
# sharing one storage directory ($IMGRESUME_STORAGE, default
# ./imgresume-storage).  In production each server runs in its own process,
# usually on its own host (see tac/server.tac and docs/operations.md).
import os

from twisted.application.service import Application

from imgresume.balancer import tap
from imgresume.server import make_server_service

storage = os.path.abspath(os.environ.get("IMGRESUME_STORAGE", "imgresume-storage"))
os.makedirs(storage, exist_ok=True)

application = Application("imgresume-cluster")
backends = []
for i in (1, 2, 3):
    port = 9000 + i
    make_server_service(
        f"tcp:{port}:interface=127.0.0.1", storage, server_id=f"node-{i}"
    ).setServiceParent(application)
    backends.append(f"tcp:127.0.0.1:{port}")
config = tap.Options()
config.parseOptions(["--listen", "tcp:7000:interface=127.0.0.1"]
                    + [arg for backend in backends for arg in ("--backend", backend)])
tap.makeService(config).setServiceParent(application)
