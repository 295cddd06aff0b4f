"""Tests of imgresume.http: tus 1.0.0 over twisted.web, its headers, bodies and wiring."""
