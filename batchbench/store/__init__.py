"""Plain files in the workdir: result rows, throughput points, run metadata, checkpoints."""
