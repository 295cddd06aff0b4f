# The imgresume round-robin balancer:  twistd -ny tac/balancer.tac
#
#   IMGRESUME_LB_LISTEN  endpoint to listen on  [tcp:7000:interface=127.0.0.1]
#   IMGRESUME_BACKENDS   space-separated backend endpoints
#                        [tcp:127.0.0.1:9001 tcp:127.0.0.1:9002 tcp:127.0.0.1:9003]
#   IMGRESUME_LB_ARGS    more `twistd imgresume-lb` options, e.g. "--check-interval 5"
import os

from twisted.application.service import Application

from imgresume.balancer import tap

backends = os.environ.get(
    "IMGRESUME_BACKENDS", "tcp:127.0.0.1:9001 tcp:127.0.0.1:9002 tcp:127.0.0.1:9003"
).split()
config = tap.Options()
config.parseOptions(
    ["--listen", os.environ.get("IMGRESUME_LB_LISTEN", "tcp:7000:interface=127.0.0.1")]
    + [arg for backend in backends for arg in ("--backend", backend)]
    + os.environ.get("IMGRESUME_LB_ARGS", "").split()
)
application = Application("imgresume-lb")
tap.makeService(config).setServiceParent(application)
