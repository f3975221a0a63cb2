"""What the commands run: trial, throughput phase, sweep, worker, probe, decompose."""
