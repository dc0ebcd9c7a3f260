"""Owner-side key management: local keystore (key server: see docs)."""
