"""
The ``mtls:`` server endpoint string for imgresume (and any Twisted program):
TLS that requires a client certificate signed by a given CA::

    mtls:PORT:privateKey=KEY.pem:certKey=CERT.pem:caCerts=CA.pem[:interface=ADDR]

Kept tiny: the parser lives in L{imgresume.tls}, which imports OpenSSL only
when an ``mtls:`` string is parsed.  See docs/tls.md.
"""

from imgresume.tls import MutualTLSServerParser

imgresumeMutualTLSEndpoint = MutualTLSServerParser()
