"""Data sources: embedded datasets and device-resident batching."""
