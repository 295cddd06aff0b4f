# One imgresume server:  twistd -ny tac/server.tac
#
# Settings come from the environment so one file serves every host:
#   IMGRESUME_LISTEN     endpoint to listen on   [tcp:9001:interface=127.0.0.1]
#   IMGRESUME_STORAGE    shared storage directory [/srv/imgresume]
#   IMGRESUME_SERVER_ID  name in logs/handshake   [HOST:PID]
import os

from twisted.application.service import Application

from imgresume.server import make_server_service

application = Application("imgresume-server")
make_server_service(
    os.environ.get("IMGRESUME_LISTEN", "tcp:9001:interface=127.0.0.1"),
    os.environ.get("IMGRESUME_STORAGE", "/srv/imgresume"),
    server_id=os.environ.get("IMGRESUME_SERVER_ID"),
).setServiceParent(application)
