# -*- test-case-name: tests.test_logs -*-
"""
What imgresume's logs are made of, beyond C{twisted.logger} itself: the
escaping of text that peers send (L{escape}), applied at every log call
that carries such text; the bound on how often one peer's misdeeds are
logged (L{PeerLogLimiter}); and JSON output (L{json_observer}, for
C{twistd --logger=imgresume.logs.json_observer}; L{JSONLinesObserver}).
"""

from imgresume.logs._escape import escape
from imgresume.logs._json import JSONLinesObserver, event_record, json_observer
from imgresume.logs._limit import PeerLogLimiter

__all__ = ["escape", "PeerLogLimiter", "JSONLinesObserver", "event_record", "json_observer"]
