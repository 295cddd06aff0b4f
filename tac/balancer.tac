# The imgresume round-robin balancer:  twistd -ny tac/balancer.tac
#
#   IMGRESUME_LB_LISTEN  endpoint to listen on  [tcp:7000:interface=127.0.0.1]
#   IMGRESUME_BACKENDS   space-separated backend endpoints
#                        [tcp:127.0.0.1:9001 tcp:127.0.0.1:9002 tcp:127.0.0.1:9003]
import os

from twisted.application import strports
from twisted.application.service import Application
from twisted.internet import reactor

from imgresume.balancer import buildBalancer

application = Application("imgresume-lb")
backends = os.environ.get(
    "IMGRESUME_BACKENDS", "tcp:127.0.0.1:9001 tcp:127.0.0.1:9002 tcp:127.0.0.1:9003"
).split()
strports.service(
    os.environ.get("IMGRESUME_LB_LISTEN", "tcp:7000:interface=127.0.0.1"),
    buildBalancer(reactor, backends),
).setServiceParent(application)
