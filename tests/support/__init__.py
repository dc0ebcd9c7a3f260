"""Helpers shared by the tests (hand-built bundles, models, op cases, a key-server process)."""
