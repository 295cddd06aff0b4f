"""Tests of imgresume.protocol: frames, the decoder, the sans-IO client and server machines."""
