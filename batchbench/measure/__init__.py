"""Measurement primitives: time (ledger, windows), memory, FLOPs. Pure helpers; no programs."""
