"""imgresume: resumable upload of large image files through a load balancer
to a pool of Twisted servers sharing one storage."""

__version__ = "0.1.0"
