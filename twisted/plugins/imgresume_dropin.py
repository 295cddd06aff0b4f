"""
twistd plugins for imgresume: ``twistd imgresume`` (an upload server) and
``twistd imgresume-lb`` (the round-robin balancer in front of servers).

Kept tiny on purpose: twistd imports every drop-in to list subcommands, so the
real modules are named by string and imported only when a subcommand runs.
"""

from twisted.application.service import ServiceMaker

imgresumeServer = ServiceMaker(
    "imgresume upload server",
    "imgresume.server.tap",
    "A resumable image-upload server over shared storage",
    "imgresume",
)

imgresumeBalancer = ServiceMaker(
    "imgresume round-robin balancer",
    "imgresume.balancer.tap",
    "A round-robin TCP balancer in front of imgresume servers",
    "imgresume-lb",
)
