"""The report: per-batch tables, the recommendation, plots; rendered as MD/HTML/CSV/PNG."""
